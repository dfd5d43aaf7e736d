/* Tests of the node graph: names, options, children, permissions,
 * deletion rules and drained sections. */
#include <check.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <fcntl.h>
#include <glib/gstdio.h>
#include <string.h>
#include <unistd.h>

#include "block-private.h"
#include "qcow2/qcow2.h"
#define STRATA_TEST_CONTEXT
#include "test-util.h"

static char *make_file(const char *name, size_t size)
{
    return strata_test_make_file(dir, name, size, false);
}

static StrataNode *add(const char *spec, GError **err)
{
    return strata_context_add_node_keyval(ctx, spec, err);
}

static void expect_error(const char *spec, const char *msg)
{
    g_autoptr(GError) err = NULL;
    StrataNode *n = add(spec, &err);
    ck_assert_msg(n == NULL, "'%s' should fail", spec);
    ck_assert_msg(err != NULL, "'%s': no error set", spec);
    ck_assert_msg(strstr(err->message, msg) != NULL,
                  "'%s': got '%s', expected '%s'", spec, err->message, msg);
}

START_TEST(test_names)
{
    g_autoptr(GError) err = NULL;

    ck_assert(add("driver=null-co,node-name=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                  &err));
    expect_error("driver=null-co,node-name=bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
                 "Node name too long");
    ck_assert(add("driver=null-co,node-name=a-b_c.d", &err));
    expect_error("driver=null-co,node-name=_x", "Invalid node-name: '_x'");
    expect_error("driver=null-co,node-name=1bad",
                 "Invalid node-name: '1bad'");
    expect_error("driver=null-co,node-name=x y", "Invalid node-name");
    expect_error("driver=null-co,node-name=#block1", "Invalid node-name");
    expect_error("driver=null-co,node-name=a-b_c.d",
                 "Duplicate nodes with node-name='a-b_c.d'");

    /* A node without a name gets a '#' name no user can pick. */
    StrataNode *anon = add("driver=null-co", &err);
    ck_assert(anon);
    ck_assert_int_eq(strata_node_get_name(anon)[0], '#');
    ck_assert_ptr_eq(strata_context_find_node(ctx,
                                              strata_node_get_name(anon)),
                     anon);
}
END_TEST

START_TEST(test_option_errors)
{
    expect_error("node-name=x", "Parameter 'driver' is missing");
    expect_error("driver=nosuchdriver",
                 "Parameter 'driver' does not accept value 'nosuchdriver'");
    expect_error("driver=null-co,bogus=1", "Parameter 'bogus' is unexpected");
    expect_error("driver=null-co,cache.bogus=1",
                 "Parameter 'cache.bogus' is unexpected");
    expect_error("driver=null-co,read-only=maybe",
                 "Parameter 'read-only' expects 'on' or 'off'");
    expect_error("driver=null-co,detect-zeroes=sometimes",
                 "Parameter 'detect-zeroes' does not accept value");
    expect_error("driver=null-co,detect-zeroes=unmap",
                 "setting detect-zeroes to unmap is not allowed");
    expect_error("driver=null-co,force-share=on",
                 "force-share=on can only be used with read-only images");
    expect_error("driver=raw", "Parameter 'file' is missing");
    expect_error("driver=raw,file=nothere",
                 "Cannot find device='nothere' nor node-name='nothere'");

    /* JSON keeps its types: a string where a boolean belongs is wrong. */
    expect_error("{\"driver\": \"null-co\", \"read-only\": \"on\"}",
                 "Invalid parameter type for 'read-only', expected: boolean");
    expect_error("{\"driver\": \"null-co\", \"cache\": 1}",
                 "Invalid parameter type for 'cache'");
    expect_error("{\"driver\": 7}",
                 "Invalid parameter type for 'driver', expected: string");

    /* Nothing half-opened stays behind. */
    ck_assert_ptr_null(ctx->all_nodes);
}
END_TEST

START_TEST(test_nested_children)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_file("disk.raw", 1 << 20);
    g_autofree char *spec = g_strdup_printf(
        "driver=raw,node-name=disk,read-only=on,file.driver=file,"
        "file.filename=%s,file.node-name=disk-file", path);

    StrataNode *disk = add(spec, &err);
    ck_assert_msg(disk, "%s", err ? err->message : "");
    StrataNode *file = strata_context_find_node(ctx, "disk-file");
    ck_assert(file);
    ck_assert_ptr_eq(disk->file->node, file);
    /* The nested file inherits read-only from its parent. */
    ck_assert(strata_node_is_read_only(file));
    ck_assert_int_eq(strata_node_get_length(disk), 1 << 20);
    ck_assert_str_eq(disk->filename, path);

    /* Deletion rules, in QEMU's words. */
    g_clear_error(&err);
    ck_assert(!strata_context_del_node(ctx, "disk-file", &err));
    ck_assert_str_eq(err->message, "Node disk-file is not owned by the monitor");
    g_clear_error(&err);
    ck_assert(!strata_context_del_node(ctx, "nope", &err));
    ck_assert_str_eq(err->message, "Failed to find node with node-name='nope'");
    g_clear_error(&err);
    ck_assert(strata_context_del_node(ctx, "disk", &err));
    /* The implicit child went with it. */
    ck_assert_ptr_null(strata_context_find_node(ctx, "disk-file"));
    ck_assert_ptr_null(ctx->all_nodes);
}
END_TEST

START_TEST(test_in_use)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_file("d.raw", 65536);
    g_autofree char *fspec = g_strdup_printf(
        "driver=file,node-name=f,filename=%s", path);

    ck_assert(add(fspec, &err));
    ck_assert(add("driver=raw,node-name=r,file=f", &err));
    ck_assert(!strata_context_del_node(ctx, "f", &err));
    ck_assert_str_eq(err->message, "Block device f is in use");
    g_clear_error(&err);

    StrataBackend *blk = strata_backend_new(ctx, "r", true, &err);
    ck_assert_msg(blk, "%s", err ? err->message : "");
    ck_assert(!strata_context_del_node(ctx, "r", &err));
    ck_assert_str_eq(err->message, "Node r is in use");
    g_clear_error(&err);
    strata_backend_unref(blk);
    ck_assert(strata_context_del_node(ctx, "r", &err));
    ck_assert(strata_context_del_node(ctx, "f", &err));
}
END_TEST

START_TEST(test_permissions)
{
    g_autoptr(GError) err = NULL;

    ck_assert(add("driver=null-co,node-name=n,size=1048576", &err));
    ck_assert(add("driver=null-co,node-name=ro,size=1048576,read-only=on", &err));

    /* Two writers conflict; a reader next to a writer is fine. */
    StrataBackend *w1 = strata_backend_new(ctx, "n", true, &err);
    ck_assert(w1);
    StrataBackend *w2 = strata_backend_new(ctx, "n", true, &err);
    ck_assert(w2 == NULL);
    ck_assert_str_eq(err->message,
                     "Permission conflict on node 'n': permissions 'write' "
                     "are both required by an unnamed block device (uses "
                     "node 'n' as 'root' child) and unshared by an unnamed "
                     "block device (uses node 'n' as 'root' child).");
    g_clear_error(&err);
    StrataBackend *r1 = strata_backend_new(ctx, "n", false, &err);
    ck_assert(r1);
    ck_assert_int_eq(ctx->all_nodes ? 1 : 0, 1);

    /* After the writer goes, a second writer is allowed. */
    strata_backend_unref(w1);
    w2 = strata_backend_new(ctx, "n", true, &err);
    ck_assert(w2);
    strata_backend_unref(w2);
    strata_backend_unref(r1);

    /* Writing to a read-only node is refused at attach time. */
    StrataBackend *w3 = strata_backend_new(ctx, "ro", true, &err);
    ck_assert(w3 == NULL);
    ck_assert_str_eq(err->message, "Block node is read-only");
    g_clear_error(&err);

    ck_assert(strata_backend_new(ctx, "missing", false, &err) == NULL);
    ck_assert_str_eq(err->message,
                     "Cannot find device='missing' nor node-name='missing'");
}
END_TEST

START_TEST(test_perm_propagates)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_file("p.raw", 65536);
    g_autofree char *fspec = g_strdup_printf(
        "driver=file,node-name=f,filename=%s", path);

    ck_assert(add(fspec, &err));
    ck_assert(add("driver=raw,node-name=r1,file=f", &err));
    ck_assert(add("driver=raw,node-name=r2,file=f", &err));
    StrataNode *f = strata_context_find_node(ctx, "f");

    /* A writer on r1 makes r1 ask for write on f ... */
    StrataBackend *w = strata_backend_new(ctx, "r1", true, &err);
    ck_assert(w);
    ck_assert(f->cur_perm & STRATA_PERM_WRITE);
    /* ... so a writer on r2 must conflict one level down. */
    StrataBackend *w2 = strata_backend_new(ctx, "r2", true, &err);
    ck_assert(w2 == NULL);
    ck_assert_msg(strstr(err->message, "Permission conflict on node 'f'"),
                  "%s", err->message);
    g_clear_error(&err);
    /* The failed attempt left nothing behind. */
    StrataNode *r2 = strata_context_find_node(ctx, "r2");
    ck_assert_ptr_null(r2->parents);
    ck_assert_uint_eq(r2->file->perm, 0);

    strata_backend_unref(w);
    ck_assert_uint_eq(f->cur_perm & STRATA_PERM_WRITE, 0);
}
END_TEST

START_TEST(test_cycle_refused)
{
    g_autoptr(GError) err = NULL;
    ck_assert(add("driver=null-co,node-name=a", &err));
    ck_assert(add("driver=blkdebug,node-name=b,image=a", &err));
    StrataNode *a = strata_context_find_node(ctx, "a");
    StrataNode *b = strata_context_find_node(ctx, "b");
    ck_assert(strata_node_attach_child(a, b, "file", STRATA_CHILD_FILE,
                                       STRATA_PARENT_NODE, NULL, NULL, 0, 0,
                                       &err) == NULL);
    ck_assert_msg(strstr(err->message, "cycle"), "%s", err->message);
}
END_TEST

/* A request that stays in flight until the test lets it go. */
typedef struct {
    StrataBackend *blk;
    bool started, done;
    int ret;
} SlowReq;

static void slow_read_co(void *opaque)
{
    SlowReq *r = opaque;
    char buf[512];
    r->started = true;
    r->ret = strata_backend_co_pread(r->blk, 0, buf, sizeof(buf));
    r->done = true;
}

START_TEST(test_drain)
{
    g_autoptr(GError) err = NULL;
    /* latency-ns keeps each read in flight for 20 ms. */
    ck_assert(add("driver=null-co,node-name=slow,size=1048576,latency-ns=20000000",
                  &err));
    StrataNode *n = strata_context_find_node(ctx, "slow");
    StrataBackend *blk = strata_backend_new(ctx, "slow", false, &err);
    ck_assert(blk);

    SlowReq a = { blk };
    strata_coroutine_enter(strata_coroutine_new(slow_read_co, &a));
    ck_assert(a.started && !a.done);
    ck_assert_uint_ge(n->in_flight, 1);

    /* drained_begin returns only once the request has finished. */
    strata_node_drained_begin(n);
    ck_assert(a.done);
    ck_assert_int_eq(a.ret, 0);
    ck_assert_uint_eq(n->in_flight, 0);

    /* A request made while drained waits until the section ends. */
    SlowReq b = { blk };
    strata_coroutine_enter(strata_coroutine_new(slow_read_co, &b));
    for (int i = 0; i < 5; i++) {
        strata_loop_iterate(ctx->loop, false);
    }
    ck_assert(b.started && !b.done);
    ck_assert_uint_eq(n->in_flight, 0);
    strata_node_drained_end(n);
    strata_backend_drain(blk);
    ck_assert(b.done);
    ck_assert_int_eq(b.ret, 0);
    strata_backend_unref(blk);
}
END_TEST

START_TEST(test_close_flushes)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_file("v.raw", 65536);
    g_autofree char *spec = g_strdup_printf(
        "driver=blkdebug,node-name=v,x-volatile-cache=on,"
        "image.driver=file,image.filename=%s", path);
    unsigned char buf[4096];

    ck_assert_msg(add(spec, &err), "%s", err ? err->message : "");
    StrataBackend *blk = strata_backend_new(ctx, "v", true, &err);
    ck_assert(blk);
    memset(buf, 0x3c, sizeof(buf));
    ck_assert_int_eq(strata_backend_pwrite(blk, 4096, buf, sizeof(buf), 0),
                     0);
    /* Held in the volatile cache: not on disk yet. */
    int fd = open(path, O_RDONLY);
    ck_assert_int_eq(pread(fd, buf, sizeof(buf), 4096), sizeof(buf));
    ck_assert_uint_eq(buf[0], 0);
    strata_backend_unref(blk);
    ck_assert(strata_context_del_node(ctx, "v", &err));
    /* Closing the node flushed it. */
    ck_assert_int_eq(pread(fd, buf, sizeof(buf), 4096), sizeof(buf));
    ck_assert_uint_eq(buf[0], 0x3c);
    ck_assert_uint_eq(buf[4095], 0x3c);
    close(fd);
}
END_TEST


/* An overlay takes over every parent of its base; removing it gives them
 * back. */
START_TEST(test_append_overlay)
{
    g_autoptr(GError) err = NULL;
    ck_assert(add("driver=null-co,node-name=base,size=1048576,"
                  "latency-ns=20000000", &err));
    ck_assert(add("driver=null-co,node-name=ov,size=1048576", &err));
    ck_assert(add("driver=null-co,node-name=ov2,size=1048576", &err));
    StrataNode *base = strata_context_find_node(ctx, "base");
    StrataNode *ov = strata_context_find_node(ctx, "ov");
    StrataNode *ov2 = strata_context_find_node(ctx, "ov2");
    StrataBackend *blk = strata_backend_new(ctx, "base", false, &err);
    ck_assert(blk);

    /* A request in flight on the base finishes before the switch. */
    SlowReq a = { blk };
    strata_coroutine_enter(strata_coroutine_new(slow_read_co, &a));
    ck_assert(a.started && !a.done);
    ck_assert_msg(strata_node_append_overlay(base, ov, &err), "%s",
                  err ? err->message : "");
    ck_assert(a.done);
    ck_assert_ptr_eq(strata_backend_get_node(blk), ov);
    ck_assert_ptr_eq(strata_node_backing(ov), base);
    ck_assert_uint_eq(g_list_length(base->parents), 1);
    ck_assert_uint_eq(base->quiesce_counter, 0);
    ck_assert_uint_eq(ov->quiesce_counter, 0);

    /* An overlay with a backing node cannot be appended; nothing moves. */
    ck_assert(!strata_node_append_overlay(ov2, ov, &err));
    ck_assert_str_eq(err->message, "The overlay already has a backing image");
    g_clear_error(&err);
    ck_assert_ptr_eq(strata_backend_get_node(blk), ov);

    /* A cycle is refused and leaves the graph alone. */
    ck_assert(!strata_node_append_overlay(ov, base, &err));
    g_clear_error(&err);
    ck_assert_ptr_eq(strata_backend_get_node(blk), ov);
    ck_assert_ptr_eq(strata_node_backing(base), NULL);

    /* Requests go on after the section. */
    SlowReq b = { blk };
    strata_coroutine_enter(strata_coroutine_new(slow_read_co, &b));
    strata_backend_drain(blk);
    ck_assert(b.done);
    ck_assert_int_eq(b.ret, 0);

    ck_assert(strata_node_remove_overlay(ov, &err));
    ck_assert_ptr_eq(strata_backend_get_node(blk), base);
    ck_assert_ptr_eq(strata_node_backing(ov), NULL);
    ck_assert_uint_eq(g_list_length(ov->parents), 0);
    ck_assert(!strata_node_remove_overlay(ov, &err));
    g_clear_error(&err);
    strata_backend_unref(blk);
}
END_TEST

/* A drain set releases exactly what it took, whatever the graph became. */
START_TEST(test_drain_set)
{
    g_autoptr(GError) err = NULL;
    ck_assert(add("driver=null-co,node-name=b,size=1048576", &err));
    ck_assert(add("driver=null-co,node-name=o,size=1048576", &err));
    StrataNode *b = strata_context_find_node(ctx, "b");
    StrataNode *o = strata_context_find_node(ctx, "o");
    StrataBackend *blk = strata_backend_new(ctx, "b", false, &err);
    StrataDrainSet *set = strata_drain_set_new(ctx);

    strata_drain_set_add(set, b);
    strata_drain_set_add(set, b);
    ck_assert_uint_eq(b->quiesce_counter, 1);
    strata_drain_set_add(set, o);
    ck_assert(strata_node_move_parents(b, o, &err));
    /* A request now waits on the new root, still drained. */
    SlowReq r = { blk };
    strata_coroutine_enter(strata_coroutine_new(slow_read_co, &r));
    for (int i = 0; i < 3; i++) {
        strata_loop_iterate(ctx->loop, false);
    }
    ck_assert(r.started && !r.done);
    strata_drain_set_free(set);
    ck_assert_uint_eq(b->quiesce_counter, 0);
    ck_assert_uint_eq(o->quiesce_counter, 0);
    strata_backend_drain(blk);
    ck_assert(r.done);
    strata_backend_unref(blk);
}
END_TEST


/* ---- reopen ---- */

/* How the process has @path open: 'w' when some descriptor writes it,
 * 'r' when only readers, 0 when not at all; 'd' is added for O_DIRECT. */
static void fd_modes(const char *path, bool *any_rw, bool *any_ro,
                     bool *any_direct)
{
    g_autoptr(GDir) d = g_dir_open("/proc/self/fd", 0, NULL);
    const char *n;

    *any_rw = *any_ro = *any_direct = false;
    ck_assert(d);
    while ((n = g_dir_read_name(d))) {
        g_autofree char *link = g_build_filename("/proc/self/fd", n, NULL);
        g_autofree char *target = g_file_read_link(link, NULL);
        g_autofree char *info = NULL;
        g_autofree char *ipath = g_strdup_printf("/proc/self/fdinfo/%s", n);
        const char *f;
        unsigned long flags;

        if (!target || strcmp(target, path) != 0 ||
            !g_file_get_contents(ipath, &info, NULL, NULL) ||
            !(f = strstr(info, "flags:"))) {
            continue;
        }
        flags = strtoul(f + 6, NULL, 8);
        if ((flags & O_ACCMODE) == O_RDWR) {
            *any_rw = true;
        } else {
            *any_ro = true;
        }
        if (flags & O_DIRECT) {
            *any_direct = true;
        }
    }
}

static JsonObject *parse_obj(const char *json)
{
    g_autoptr(JsonParser) p = json_parser_new();
    ck_assert(json_parser_load_from_data(p, json, -1, NULL));
    return json_object_ref(json_node_get_object(json_parser_get_root(p)));
}

static char *make_qcow2(const char *name)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) o = parse_obj("{\"size\": 1048576}");
    char *path = g_build_filename(dir, name, NULL);

    ck_assert_msg(strata_qcow2_create(ctx, path, o, &err), "%s",
                  err ? err->message : "");
    return path;
}

/* Reopens with the JSON option sets in @sets (NULL-terminated). */
static bool reopen(GError **err, ...)
{
    g_autoptr(GPtrArray) a =
        g_ptr_array_new_with_free_func((GDestroyNotify)json_object_unref);
    va_list ap;
    const char *j;

    va_start(ap, err);
    while ((j = va_arg(ap, const char *))) {
        g_ptr_array_add(a, parse_obj(j));
    }
    va_end(ap);
    return strata_node_reopen_multiple(ctx, a, err);
}

START_TEST(test_reopen_file_modes)
{
    g_autofree char *path = make_file("r.img", 1 << 20);
    g_autofree char *spec = g_strdup_printf("driver=file,node-name=f,"
                                            "filename=%s", path);
    g_autofree char *ro = g_strdup_printf("{\"driver\": \"file\", "
        "\"node-name\": \"f\", \"filename\": \"%s\", \"read-only\": true}",
        path);
    g_autofree char *rw_direct = g_strdup_printf("{\"driver\": \"file\", "
        "\"node-name\": \"f\", \"filename\": \"%s\", "
        "\"cache\": {\"direct\": true}}", path);
    g_autofree char *other = g_strdup_printf("{\"driver\": \"file\", "
        "\"node-name\": \"f\", \"filename\": \"%s.x\"}", path);
    g_autoptr(GError) err = NULL;
    bool rw, rdonly, direct;
    StrataNode *f = add(spec, &err);

    ck_assert_msg(f, "%s", err ? err->message : "");
    fd_modes(path, &rw, &rdonly, &direct);
    ck_assert(rw && !rdonly && !direct);

    ck_assert_msg(reopen(&err, ro, NULL), "%s", err ? err->message : "");
    ck_assert(strata_node_is_read_only(f));
    fd_modes(path, &rw, &rdonly, &direct);
    ck_assert(!rw && rdonly);

    ck_assert_msg(reopen(&err, rw_direct, NULL), "%s",
                  err ? err->message : "");
    ck_assert(!strata_node_is_read_only(f));
    fd_modes(path, &rw, &rdonly, &direct);
    ck_assert(rw && !rdonly && direct);
    ck_assert_uint_ge(f->limits.request_alignment, 512);

    /* What cannot change is refused and nothing moves. */
    ck_assert(!reopen(&err, other, NULL));
    ck_assert_str_eq(err->message, "Cannot change the option 'filename'");
    g_clear_error(&err);
    fd_modes(path, &rw, &rdonly, &direct);
    ck_assert(rw && direct);
}
END_TEST

START_TEST(test_reopen_all_or_none)
{
    g_autofree char *path = make_qcow2("a.qcow2");
    g_autofree char *spec = g_strdup_printf("driver=qcow2,node-name=q,"
        "file.driver=file,file.node-name=qf,file.filename=%s", path);
    g_autofree char *file_ro = g_strdup_printf("{\"driver\": \"file\", "
        "\"node-name\": \"qf\", \"filename\": \"%s\", \"read-only\": true}",
        path);
    g_autoptr(GError) err = NULL;
    bool rw, rdonly, direct;
    StrataNode *q = add(spec, &err);
    StrataNode *n = add("driver=null-co,node-name=n,size=4096", &err);

    ck_assert(q && n);
    /* The second set fails after the first was prepared. */
    ck_assert(!reopen(&err, "{\"driver\": \"null-co\", \"node-name\": "
                      "\"n\", \"read-only\": true, \"size\": 4096}",
                      file_ro, NULL));
    /* qcow2 keeps writing its metadata: the file cannot go read-only. */
    ck_assert_str_eq(err->message, "Cannot make block node read-only, "
                                   "there is a writer on it");
    g_clear_error(&err);
    ck_assert(!strata_node_is_read_only(n));
    ck_assert(!strata_node_is_read_only(q->file->node));
    fd_modes(path, &rw, &rdonly, &direct);
    ck_assert(rw && !rdonly);

    /* Leaving out an option given at open, changing one that cannot
     * change, an empty list. */
    ck_assert(!reopen(&err, "{\"driver\": \"null-co\", \"node-name\": "
                      "\"n\"}", NULL));
    ck_assert_str_eq(err->message,
                     "Option 'size' cannot be reset to its default value");
    g_clear_error(&err);
    ck_assert(!reopen(&err, "{\"driver\": \"null-co\", \"node-name\": "
                      "\"n\", \"size\": 8192}", NULL));
    ck_assert_str_eq(err->message, "Cannot change the option 'size'");
    g_clear_error(&err);
    ck_assert(!reopen(&err, NULL));
    ck_assert(err != NULL);
    g_clear_error(&err);

    /* Reopening the format takes its nested file child along. */
    ck_assert_msg(reopen(&err, "{\"driver\": \"qcow2\", \"node-name\": "
                        "\"q\", \"file\": \"qf\", \"read-only\": true}", NULL),
                  "%s", err ? err->message : "");
    ck_assert(strata_node_is_read_only(q));
    ck_assert(strata_node_is_read_only(q->file->node));
    fd_modes(path, &rw, &rdonly, &direct);
    ck_assert(!rw && rdonly);
    /* And back, stated explicitly (a left-out read-only would leave the
     * file read-only, as in QEMU). */
    ck_assert(!reopen(&err, "{\"driver\": \"qcow2\", \"node-name\": "
                      "\"q\", \"file\": \"qf\"}", NULL));
    ck_assert_str_eq(err->message, "Block node is read-only");
    g_clear_error(&err);
    ck_assert(strata_node_is_read_only(q));
    ck_assert_msg(reopen(&err, "{\"driver\": \"qcow2\", \"node-name\": "
                        "\"q\", \"file\": \"qf\", \"read-only\": false}",
                        NULL), "%s", err ? err->message : "");
    ck_assert(!strata_node_is_read_only(q->file->node));
    fd_modes(path, &rw, &rdonly, &direct);
    ck_assert(rw && !rdonly);
}
END_TEST

START_TEST(test_reopen_backing)
{
    g_autoptr(GError) err = NULL;
    StrataNode *b = add("driver=null-co,node-name=b,size=1048576", &err);
    g_autofree char *path = make_qcow2("t.qcow2");
    g_autofree char *spec = g_strdup_printf("driver=qcow2,node-name=t,"
        "file.driver=file,file.node-name=tf,file.filename=%s", path);
    StrataNode *t = add(spec, &err);

    ck_assert_msg(b && t, "%s", err ? err->message : "");
    ck_assert(strata_node_backing(t) == NULL);

    ck_assert_msg(reopen(&err, "{\"driver\": \"qcow2\", \"node-name\": "
                        "\"t\", \"file\": \"tf\", \"backing\": \"b\"}", NULL),
                  "%s", err ? err->message : "");
    ck_assert(strata_node_backing(t) == b);
    ck_assert(!reopen(&err, "{\"driver\": \"qcow2\", \"node-name\": \"t\", "
                      "\"file\": \"tf\"}", NULL));
    ck_assert_str_eq(err->message, "backing is missing for 't'");
    g_clear_error(&err);
    ck_assert(!reopen(&err, "{\"driver\": \"qcow2\", \"node-name\": \"t\", "
                      "\"file\": \"tf\", \"backing\": \"t\"}", NULL));
    ck_assert_str_eq(err->message,
                     "Making 't' a backing child of 't' would create a cycle");
    g_clear_error(&err);
    ck_assert(!reopen(&err, "{\"driver\": \"qcow2\", \"node-name\": \"t\", "
                      "\"file\": \"tf\", \"backing\": \"nowhere\"}", NULL));
    ck_assert_str_eq(err->message,
                     "Cannot find device='' nor node-name='nowhere'");
    g_clear_error(&err);
    ck_assert(strata_node_backing(t) == b);
    ck_assert_msg(reopen(&err, "{\"driver\": \"qcow2\", \"node-name\": "
                        "\"t\", \"file\": \"tf\", \"backing\": null}", NULL),
                  "%s", err ? err->message : "");
    ck_assert(strata_node_backing(t) == NULL);
    ck_assert(b->parents == NULL);
    /* With no backing child and none in the header, it may be left out. */
    ck_assert_msg(reopen(&err, "{\"driver\": \"qcow2\", \"node-name\": "
                        "\"t\", \"file\": \"tf\"}", NULL),
                  "%s", err ? err->message : "");
}
END_TEST

START_TEST(test_options_untouched_and_ro_switch)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_file("u.raw", 65536);
    g_autofree char *text = g_strdup_printf(
        "{\"driver\": \"raw\", \"node-name\": \"u\", \"read-only\": true, "
        "\"cache\": {\"no-flush\": true}, "
        "\"file\": {\"driver\": \"file\", \"filename\": \"%s\"}}", path);
    g_autoptr(JsonParser) parser = json_parser_new();
    ck_assert(json_parser_load_from_data(parser, text, -1, NULL));
    JsonObject *o = json_node_get_object(json_parser_get_root(parser));

    StrataNode *n = strata_context_add_node(ctx, o, &err);
    ck_assert_msg(n, "%s", err ? err->message : "");
    /* The caller's options, nested levels included, are not edited by
     * the options the child inherits. */
    JsonObject *f = json_object_get_object_member(o, "file");
    ck_assert(!json_object_has_member(f, "read-only"));
    ck_assert(!json_object_has_member(f, "cache"));

    /* Read-only switch through a reopen: the file follows. */
    ck_assert(strata_node_is_read_only(n->file->node));
    ck_assert_msg(strata_node_set_read_only(n, false, &err), "%s",
                  err ? err->message : "");
    ck_assert(!strata_node_is_read_only(n));
    ck_assert(!strata_node_is_read_only(n->file->node));
    StrataBackend *w = strata_backend_new(ctx, "u", true, &err);
    ck_assert_msg(w, "%s", err ? err->message : "");
    /* With a writer on it, it cannot go back. */
    ck_assert(!strata_node_set_read_only(n, true, &err));
    g_clear_error(&err);
    strata_backend_unref(w);
    ck_assert_msg(strata_node_set_read_only(n, true, &err), "%s",
                  err ? err->message : "");
    ck_assert(strata_node_is_read_only(n->file->node));
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/graph/names", test_names },
        { "/graph/options/errors", test_option_errors },
        { "/graph/children/nested", test_nested_children },
        { "/graph/del/in-use", test_in_use },
        { "/graph/perm/conflict", test_permissions },
        { "/graph/perm/propagate", test_perm_propagates },
        { "/graph/children/cycle", test_cycle_refused },
        { "/graph/drain", test_drain },
        { "/graph/close/flushes", test_close_flushes },
        { "/graph/reopen/file-modes", test_reopen_file_modes },
        { "/graph/reopen/all-or-none", test_reopen_all_or_none },
        { "/graph/reopen/backing", test_reopen_backing },
        { "/graph/overlay/append", test_append_overlay },
        { "/graph/drain/set", test_drain_set },
        { "/graph/options/untouched-ro-switch",
          test_options_untouched_and_ro_switch },
    };

    return strata_test_main("graph", tests, strata_test_context_setup,
                            strata_test_context_teardown);
}
