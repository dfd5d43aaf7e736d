/* Tests of the raw format: plain pass-through, the offset/size window and
 * its errors, block status through the window, resizing, and mapping the
 * file for writes (raw passing it to file). */
#include <errno.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <linux/magic.h>

#include "driver.h"
#define STRATA_TEST_CONTEXT
#include "test-util.h"

static unsigned char pat(size_t i)
{
    return (unsigned char)(i * 7 + 1);
}

static StrataNode *open_raw(const char *path, const char *extra)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=disk,file.driver=file,file.filename=%s%s%s",
        path, extra ? "," : "", extra ? extra : "");
    StrataNode *n = strata_context_add_node_keyval(ctx, spec, &err);

    ck_assert_msg(n, "%s: %s", spec, err ? err->message : "");
    return n;
}

static void expect_error(const char *path, const char *extra,
                         const char *want)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=disk,file.driver=file,file.filename=%s,%s",
        path, extra);

    ck_assert_msg(!strata_context_add_node_keyval(ctx, spec, &err),
                  "%s opened", spec);
    ck_assert_msg(strstr(err->message, want), "'%s' lacks '%s'",
                  err->message, want);
    ck_assert_ptr_null(strata_context_find_node(ctx, "disk"));
}

static void read_plain(const char *path, void *buf, size_t len, off_t off)
{
    int fd = open(path, O_RDONLY);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pread(fd, buf, len, off), (ssize_t)len);
    close(fd);
}

static StrataBackend *backend(bool writable)
{
    g_autoptr(GError) err = NULL;
    StrataBackend *b = strata_backend_new(ctx, "disk", writable, &err);

    ck_assert_msg(b, "%s", err ? err->message : "");
    return b;
}

typedef struct {
    StrataNode *node;
    int op; /* 0 status, 1 truncate, 2 zeroes, 3 discard */
    uint64_t offset, bytes, pnum, map;
    StrataNode *file;
    GError *error;
    int ret;
} Call;

static void call_co(void *opaque)
{
    Call *c = opaque;

    switch (c->op) {
    case 0:
        c->ret = strata_node_co_block_status(c->node, true, c->offset,
                                             c->bytes, &c->pnum, &c->map,
                                             &c->file);
        break;
    case 1:
        c->ret = strata_node_co_truncate(c->node, c->offset, true,
                                         &c->error);
        break;
    case 2:
        c->ret = strata_node_co_pwrite_zeroes(c->node, c->offset, c->bytes,
                                              0);
        break;
    case 3:
        c->ret = strata_node_co_pdiscard(c->node, c->offset, c->bytes);
        break;
    }
}

static void run(Call *c)
{
    strata_loop_run_co(ctx->loop, call_co, c);
}

START_TEST(test_passthrough)
{
    g_autofree char *path = strata_test_make_file(dir, "a.img", 65536, true);
    StrataNode *n = open_raw(path, NULL);
    StrataBackend *b = backend(true);
    unsigned char buf[1000], back[1000];
    g_autoptr(JsonObject) img = json_object_new();

    ck_assert_int_eq(strata_node_get_length(n), 65536);
    ck_assert_str_eq(n->filename, path);
    ck_assert_int_eq(strata_backend_pread(b, 100, buf, sizeof(buf)), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        ck_assert_uint_eq(buf[i], pat(100 + i));
    }
    memset(buf, 0x3c, sizeof(buf));
    ck_assert_int_eq(strata_backend_pwrite(b, 777, buf, sizeof(buf), 0), 0);
    ck_assert_int_eq(strata_backend_flush(b), 0);
    read_plain(path, back, sizeof(back), 777);
    ck_assert_int_eq(memcmp(buf, back, sizeof(buf)), 0);

    n->drv->query_image(n, img);
    ck_assert_str_eq(json_object_get_string_member(img, "format"), "raw");
    ck_assert_int_eq(json_object_get_int_member(img, "virtual-size"), 65536);
    ck_assert(json_object_has_member(img, "actual-size"));
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_window)
{
    g_autofree char *path = strata_test_make_file(dir, "w.img", 65536, true);
    StrataNode *n = open_raw(path, "offset=4096,size=8192");
    StrataBackend *b = backend(true);
    unsigned char buf[512], back[512];

    ck_assert_int_eq(strata_node_get_length(n), 8192);
    ck_assert_int_eq(strata_backend_pread(b, 0, buf, sizeof(buf)), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        ck_assert_uint_eq(buf[i], pat(4096 + i));
    }
    /* Writes land shifted, and stay inside the window. */
    memset(buf, 0x77, sizeof(buf));
    ck_assert_int_eq(strata_backend_pwrite(b, 8192 - 512, buf, 512, 0), 0);
    read_plain(path, back, sizeof(back), 4096 + 8192 - 512);
    ck_assert_int_eq(memcmp(buf, back, sizeof(buf)), 0);
    read_plain(path, back, 1, 4096 + 8192);
    ck_assert_uint_eq(back[0], pat(4096 + 8192));
    ck_assert_int_lt(strata_backend_pwrite(b, 8192 - 256, buf, 512, 0), 0);
    read_plain(path, back, 1, 4096 + 8192);
    ck_assert_uint_eq(back[0], pat(4096 + 8192));
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_offset_only)
{
    g_autofree char *path = strata_test_make_file(dir, "o.img", 65536, true);
    StrataNode *n = open_raw(path, "offset=1000");
    StrataBackend *b = backend(false);
    unsigned char c;

    ck_assert_int_eq(strata_node_get_length(n), 65536 - 1000);
    ck_assert_int_eq(strata_backend_pread(b, 0, &c, 1), 0);
    ck_assert_uint_eq(c, pat(1000));
    strata_backend_unref(b);
}
END_TEST

START_TEST(test_window_errors)
{
    g_autofree char *path = strata_test_make_file(dir, "e.img", 65536, true);

    expect_error(path, "offset=70000",
                 "Offset (70000) cannot be greater than size of the "
                 "containing file (65536)");
    expect_error(path, "offset=4096,size=65536",
                 "The sum of offset (4096) and size (65536) has to be "
                 "smaller or equal to the actual size of the containing "
                 "file (65536)");
    expect_error(path, "size=65537", "(65537)");
    expect_error(path, "offset=abc", "'offset'");
    expect_error(path, "size=-1", "'size'");
    expect_error(path, "bogus=1", "'bogus'");
}
END_TEST

START_TEST(test_missing_child)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *nope = g_build_filename(dir, "nope.img", NULL);
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=disk,file.driver=file,file.filename=%s", nope);

    ck_assert_ptr_null(strata_context_add_node_keyval(
        ctx, "driver=raw,node-name=disk", &err));
    ck_assert_msg(strstr(err->message, "'file'"), "%s", err->message);
    g_clear_error(&err);
    ck_assert_ptr_null(strata_context_add_node_keyval(ctx, spec, &err));
    ck_assert_msg(strstr(err->message, "No such file or directory"), "%s",
                  err->message);
    g_clear_error(&err);
    ck_assert_ptr_null(strata_context_add_node_keyval(
        ctx, "driver=raw,node-name=disk,file=nosuchnode", &err));
}
END_TEST

START_TEST(test_block_status_window)
{
    g_autofree char *path = strata_test_make_file(dir, "h.img", 1 << 20,
                                                  false);
    unsigned char data[65536];
    int fd = open(path, O_RDWR);
    StrataNode *n;
    Call c;

    memset(data, 1, sizeof(data));
    ck_assert_int_eq(pwrite(fd, data, sizeof(data), 131072), sizeof(data));
    close(fd);
    n = open_raw(path, "offset=65536");

    /* [0, 64K) of the image is a hole of the file at 64K. */
    c = (Call) { .node = n, .op = 0, .offset = 0, .bytes = 1 << 19 };
    run(&c);
    ck_assert_int_ge(c.ret, 0);
    ck_assert(c.ret & STRATA_BLOCK_ZERO);
    ck_assert(!(c.ret & STRATA_BLOCK_DATA));
    ck_assert_uint_eq(c.pnum, 65536);
    ck_assert_uint_eq(c.map, 65536);
    ck_assert_ptr_eq(c.file, n->file->node);

    c = (Call) { .node = n, .op = 0, .offset = 65536, .bytes = 1 << 19 };
    run(&c);
    ck_assert(c.ret & STRATA_BLOCK_DATA);
    ck_assert_uint_eq(c.pnum, 65536);
    ck_assert_uint_eq(c.map, 131072);
}
END_TEST

START_TEST(test_zeroes_discard_shifted)
{
    g_autofree char *path = strata_test_make_file(dir, "z.img", 65536, true);
    StrataNode *n = open_raw(path, "offset=4096,file.discard=unmap,"
                             "discard=unmap");
    unsigned char back[4096];
    Call c = { .node = n, .op = 2, .offset = 0, .bytes = 4096 };

    run(&c);
    ck_assert_int_eq(c.ret, 0);
    read_plain(path, back, sizeof(back), 4096);
    for (size_t i = 0; i < sizeof(back); i++) {
        ck_assert_uint_eq(back[i], 0);
    }
    read_plain(path, back, 1, 0);
    ck_assert_uint_eq(back[0], pat(0));

    c = (Call) { .node = n, .op = 3, .offset = 8192, .bytes = 8192 };
    run(&c);
    ck_assert_int_eq(c.ret, 0);
    read_plain(path, back, 1, 4096 + 8192);
    ck_assert_uint_eq(back[0], 0);
    read_plain(path, back, 1, 8192);
    ck_assert_uint_eq(back[0], pat(8192));
}
END_TEST

START_TEST(test_truncate)
{
    g_autofree char *path = strata_test_make_file(dir, "t.img", 65536, true);
    g_autofree char *p2 = strata_test_make_file(dir, "t2.img", 65536, true);
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=fixed,size=4096,file.driver=file,"
        "file.filename=%s", p2);
    g_autoptr(GError) err = NULL;
    StrataNode *n = open_raw(path, NULL);
    StrataNode *fixed = strata_context_add_node_keyval(ctx, spec, &err);
    struct stat st;
    Call c = { .node = n, .op = 1, .offset = 1 << 20 };

    run(&c);
    ck_assert_int_eq(c.ret, 0);
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq(st.st_size, 1 << 20);
    ck_assert_int_eq(strata_node_get_length(n), 1 << 20);

    ck_assert_ptr_nonnull(fixed);
    c = (Call) { .node = fixed, .op = 1, .offset = 8192 };
    run(&c);
    ck_assert_int_lt(c.ret, 0);
    ck_assert_str_eq(c.error->message, "Cannot resize fixed-size raw disks");
    g_clear_error(&c.error);
    ck_assert_int_eq(stat(p2, &st), 0);
    ck_assert_int_eq(st.st_size, 65536);
}
END_TEST

START_TEST(test_read_only_child)
{
    g_autofree char *path = strata_test_make_file(dir, "r.img", 65536, true);
    StrataNode *n = open_raw(path, "read-only=on");
    g_autoptr(GError) err = NULL;

    /* The nested file inherits read-only, so a writer is refused. */
    ck_assert(n->file->node->read_only);
    ck_assert_ptr_null(strata_backend_new(ctx, "disk", true, &err));
}
END_TEST

/* ---- strata_backend_map_for_write ---- */

typedef struct {
    StrataWriteMap *map;
    int op;     /* 0 populate, 1 punch */
    uint64_t offset, bytes;
    int ret;
} MapCall;

static void map_call_co(void *opaque)
{
    MapCall *c = opaque;

    c->ret = c->op == 0
        ? strata_write_map_co_populate(c->map, c->offset, c->bytes)
        : strata_write_map_co_punch(c->map, c->offset, c->bytes);
}

static int map_call(StrataWriteMap *m, int op, uint64_t offset,
                    uint64_t bytes)
{
    MapCall c = { .map = m, .op = op, .offset = offset, .bytes = bytes };

    strata_loop_run_co(ctx->loop, map_call_co, &c);
    return c.ret;
}

/* A scratch directory on a file system in memory (tmpfs), or NULL. */
static char *shm_dir(void)
{
    struct statfs fs;
    char *d;

    if (statfs("/dev/shm", &fs) < 0 || fs.f_type != TMPFS_MAGIC) {
        return NULL;
    }
    d = g_build_filename("/dev/shm", "strata-map-XXXXXX", NULL);
    ck_assert_ptr_nonnull(g_mkdtemp(d));
    return d;
}

static blkcnt_t blocks_of(const char *path)
{
    struct stat st;

    ck_assert_int_eq(stat(path, &st), 0);
    return st.st_blocks;
}

START_TEST(test_map_for_write)
{
    char *shm = shm_dir();
    g_autofree char *path = NULL;
    StrataWriteMap m;
    StrataBackend *b;
    unsigned char *back = g_malloc(1 << 20);
    blkcnt_t before;

    ck_assert_msg(shm, "/dev/shm is not a tmpfs on this machine");
    path = strata_test_make_file(shm, "m.img", 1 << 20, true);
    open_raw(path, NULL);
    b = backend(true);
    before = blocks_of(path);
    ck_assert_int_eq(strata_backend_map_for_write(b, 1 << 20, &m), 0);
    ck_assert_ptr_nonnull(m.node);
    ck_assert(m.in_memory);
    /* The file's own bytes are what the mapping shows. */
    ck_assert_uint_eq(m.data[12345], pat(12345));
    ck_assert_int_eq(map_call(&m, 0, 4000, 10000), 0);
    ck_assert_int_eq(map_call(&m, 0, 0, 2 << 20), -EINVAL);
    ck_assert_int_eq(map_call(&m, 0, (1 << 20) + 1, 0), -EINVAL);
    ck_assert_int_eq(map_call(&m, 1, 4096, 1 << 20), -EINVAL);
    ck_assert_uint_eq(m.data[5000], pat(5000));     /* populated as it was */
    memset(m.data + 4096, 0xab, 8192);
    /* Whole pages inside the range only: 65536..131071 of 65000..131172. */
    ck_assert_int_eq(map_call(&m, 1, 65000, 66172), 0);
    strata_write_map_end(&m);
    ck_assert_ptr_null(m.node);
    strata_write_map_end(&m);       /* an empty map: nothing */
    ck_assert_int_eq(strata_backend_flush(b), 0);

    read_plain(path, back, 1 << 20, 0);
    for (size_t i = 0; i < (1 << 20); i++) {
        unsigned char want = i >= 4096 && i < 12288    ? 0xab
                             : i >= 65536 && i < 131072 ? 0
                                                        : pat(i);
        ck_assert_msg(back[i] == want, "byte %zu: %#x, want %#x", i, back[i],
                      want);
    }
    /* The punched 64 KiB are given back. */
    ck_assert_int_le(blocks_of(path), before - 65536 / 512);
    strata_backend_unref(b);
    g_free(back);
    strata_test_rmdir(shm);
}
END_TEST

/* Minor faults so far: @who is RUSAGE_SELF (all threads: populates
 * run on a worker thread) or RUSAGE_THREAD (this one alone).  Not
 * instrumented: AddressSanitizer may put @ru in a frame of its own
 * heap, whose pages fault in as they are first used. */
__attribute__((no_sanitize("address")))
static long minor_faults(int who)
{
    struct rusage ru;

    ck_assert_int_eq(getrusage(who, &ru), 0);
    return ru.ru_minflt;
}

/* Whether the kernel maps a read fault's neighbours in the page cache
 * with it: the default (64 KiB); debugfs may say otherwise. */
static bool fault_around(void)
{
    g_autofree char *s = NULL;

    if (!g_file_get_contents("/sys/kernel/debug/fault_around_bytes", &s,
                             NULL, NULL)) {
        return true;
    }
    return g_ascii_strtoull(s, NULL, 10) >= 4 * 4096;
}

/* Stores @v into the first byte of every page of @p.  Not checked by
 * AddressSanitizer: its shadow of the mapping would fault in on the
 * first check, and only the mapping's own faults are to be counted. */
__attribute__((no_sanitize("address")))
static void store_each_page(uint8_t *p, size_t len, size_t page, uint8_t v)
{
    for (size_t i = 0; i < len; i += page) {
        ((volatile uint8_t *)p)[i] = v;
    }
}

/*
 * Populating a mapping of a file in memory: pages already there are
 * mapped with read faults (fault-around maps many per fault), the
 * others with write faults; either way every page is then writable
 * without another fault, a hole's pages are allocated, and no byte
 * changes.  The file: 4 MiB of data, then a 4 MiB hole.
 */
START_TEST(test_map_populate)
{
    const uint64_t half = 4 << 20, quarter = 2 << 20;
    char *shm = shm_dir();
    g_autofree char *path = NULL;
    unsigned char *back = g_malloc(2 * half);
    long f0, f_mixed, f_data, f_hole;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    StrataWriteMap m;
    StrataBackend *b;

    ck_assert_msg(shm, "/dev/shm is not a tmpfs on this machine");
    path = strata_test_make_file(shm, "p.img", half, true);
    ck_assert_int_eq(truncate(path, 2 * half), 0);
    open_raw(path, NULL);
    b = backend(true);
    ck_assert_int_eq(strata_backend_map_for_write(b, 2 * half, &m), 0);
    ck_assert(m.in_memory);

    /* Across the end of the data: a run of each kind. */
    f0 = minor_faults(RUSAGE_SELF);
    ck_assert_int_eq(map_call(&m, 0, half - quarter, half), 0);
    f_mixed = minor_faults(RUSAGE_SELF) - f0;
    f0 = minor_faults(RUSAGE_SELF);
    ck_assert_int_eq(map_call(&m, 0, 0, quarter), 0);
    f_data = minor_faults(RUSAGE_SELF) - f0;
    f0 = minor_faults(RUSAGE_SELF);
    ck_assert_int_eq(map_call(&m, 0, half + quarter, quarter), 0);
    f_hole = minor_faults(RUSAGE_SELF) - f0;
    /* The hole's pages are allocated now: a full file system would have
     * said so in the populate. */
    ck_assert_int_ge(blocks_of(path), 2 * half / 512);
    if (fault_around()) {
        ck_assert_msg(f_data * 4 < f_hole,
                      "data pages populated with %ld faults, a hole's "
                      "with %ld", f_data, f_hole);
        ck_assert_msg(f_mixed < f_hole + f_hole / 2,
                      "mixed range: %ld faults, a hole's half: %ld",
                      f_mixed, f_hole);
    }

    /* Every page is present and writable: storing into each takes no
     * fault of its own, where a page left unmapped or read-only would
     * take one (2048 pages here).  A few faults come from elsewhere: a
     * build under AddressSanitizer sees 2-4 in this loop.  (Once over
     * nothing first: the faults that bring in the code.) */
    store_each_page(m.data, 0, page, 0);
    f0 = minor_faults(RUSAGE_THREAD);
    store_each_page(m.data, 2 * half, page, 0xa5);
    f0 = minor_faults(RUSAGE_THREAD) - f0;
    ck_assert_msg(f0 < 16, "%ld faults storing into populated pages", f0);
    strata_write_map_end(&m);
    ck_assert_int_eq(strata_backend_flush(b), 0);

    read_plain(path, back, 2 * half, 0);
    for (size_t i = 0; i < 2 * half; i++) {
        unsigned char want = i % page == 0 ? 0xa5 : i < half ? pat(i) : 0;

        ck_assert_msg(back[i] == want, "byte %zu: %#x, want %#x", i, back[i],
                      want);
    }
    strata_backend_unref(b);
    g_free(back);
    strata_test_rmdir(shm);
}
END_TEST

/* Opens raw over @path with @extra options, maps @bytes through a
 * backend (@writable) and closes it all again: what the map returned,
 * or 1 when the node could not be opened; *@in_memory (if not NULL)
 * what the map said of the file. */
static int try_map(const char *path, const char *extra, bool writable,
                   uint64_t bytes, bool *in_memory)
{
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=disk,file.driver=file,file.filename=%s%s%s",
        path, extra ? "," : "", extra ? extra : "");
    StrataWriteMap m;
    StrataBackend *b;
    int ret;

    if (!strata_context_add_node_keyval(ctx, spec, NULL)) {
        return 1;
    }
    b = backend(writable);
    ret = strata_backend_map_for_write(b, bytes, &m);
    /* A refusal leaves the map empty. */
    ck_assert(ret == 0 ? m.node != NULL : m.node == NULL);
    if (in_memory) {
        *in_memory = m.in_memory;
    }
    strata_write_map_end(&m);
    strata_backend_unref(b);
    ck_assert(strata_context_del_node(ctx, "disk", NULL));
    return ret;
}

/* Every case that must not map, and the reason it gives. */
START_TEST(test_map_refused)
{
    char *shm = shm_dir();
    g_autofree char *mem = NULL;
    g_autofree char *disk_data = strata_test_make_file(dir, "d.img", 65536,
                                                       true);
    g_autofree char *disk_hole = strata_test_make_file(dir, "h.img", 65536,
                                                       false);
    struct statfs fs;
    bool in_memory;
    int ret;

    ck_assert_msg(shm, "/dev/shm is not a tmpfs on this machine");
    mem = strata_test_make_file(shm, "m.img", 65536, true);

    /* A backend that may not write. */
    ck_assert_int_eq(try_map(mem, NULL, false, 65536, NULL), -EPERM);
    /* Past the file's end, and nothing at all. */
    ck_assert_int_eq(try_map(mem, NULL, true, 65537, NULL), -EINVAL);
    ck_assert_int_eq(try_map(mem, NULL, true, 0, NULL), -EINVAL);
    /* A window that does not start the file; one shorter than asked. */
    ck_assert_int_eq(try_map(mem, "offset=4096", true, 4096, NULL),
                     -ENOTSUP);
    ck_assert_int_eq(try_map(mem, "size=8192", true, 8192, NULL), 0);
    /* Zero detection must see the data. */
    ck_assert_int_eq(try_map(mem, "detect-zeroes=on", true, 65536, NULL),
                     -ENOTSUP);

    /* On a disk: data would be read in to be populated; a file with no
     * data yet maps; O_DIRECT never does. */
    ck_assert_int_eq(statfs(dir, &fs), 0);
    ck_assert_int_eq(try_map(disk_data, NULL, true, 65536, NULL),
                     fs.f_type == TMPFS_MAGIC ? 0 : -ENOTSUP);
    ck_assert_int_eq(try_map(disk_hole, NULL, true, 65536, &in_memory), 0);
    ck_assert(in_memory == (fs.f_type == TMPFS_MAGIC));
    ret = try_map(disk_hole, "file.cache.direct=on", true, 65536, NULL);
    /* (1: a file system without O_DIRECT refuses the open.) */
    ck_assert_msg(ret == -ENOTSUP || ret == 1, "O_DIRECT mapped: %d", ret);
    strata_test_rmdir(shm);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/raw/passthrough", test_passthrough },
        { "/raw/window", test_window },
        { "/raw/window/offset-only", test_offset_only },
        { "/raw/window/errors", test_window_errors },
        { "/raw/missing-child", test_missing_child },
        { "/raw/block-status", test_block_status_window },
        { "/raw/zeroes-discard", test_zeroes_discard_shifted },
        { "/raw/truncate", test_truncate },
        { "/raw/read-only", test_read_only_child },
        { "/raw/map-for-write", test_map_for_write },
        { "/raw/map-for-write/refused", test_map_refused },
        { "/raw/map-for-write/populate", test_map_populate },
    };

    return strata_test_main("raw", tests, strata_test_context_setup,
                            strata_test_context_teardown);
}
