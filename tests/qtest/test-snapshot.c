/* qtest: snapshots against stratad — blockdev-snapshot-sync and
 * blockdev-snapshot with a guest writing over NBD (the writes after the
 * reply land in the overlay only), every failure with QEMU's texts,
 * transactions failing at each action position (graph, exports, image
 * files and directory unchanged), internal snapshots, change-backing-file
 * and x-strata-blockdev-revert; images checked with qemu-img and qemu-io. */
#include <glib/gstdio.h>

#include "snapshot-helpers.h"
#include "../unit/test-util.h"

static gint cmp_str(gconstpointer a, gconstpointer b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static JsonNode *qmpf(QTestState *s, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
static JsonNode *qmpf(QTestState *s, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *req = NULL;

    va_start(ap, fmt);
    req = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    return qtest_qmp(s, req);
}

#define OK(s, ...) do { \
    g_autoptr(JsonNode) r_ = qmpf(s, __VA_ARGS__); \
    g_autofree char *t_ = r_ ? qtest_to_string(r_) : NULL; \
    ck_assert_msg(r_ && qtest_is_return(r_), "%s", t_ ? t_ : "(none)"); \
} while (0)

#define FAILS(s, desc, ...) do { \
    g_autoptr(JsonNode) r_ = qmpf(s, __VA_ARGS__); \
    g_autofree char *t_ = r_ ? qtest_to_string(r_) : NULL; \
    ck_assert_msg(r_ && !qtest_is_return(r_), "succeeded: %s", \
                  t_ ? t_ : "(none)"); \
    ck_assert_str_eq(qtest_error_class(r_), "GenericError"); \
    ck_assert_msg(g_str_has_prefix(qtest_error_desc(r_), desc), \
                  "desc '%s', want '%s'", qtest_error_desc(r_), desc); \
} while (0)

static void add_qcow2(QTestState *s, const char *name, const char *file)
{
    OK(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"%s\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"%s\"}}}", name, file);
}

static void nbd_start(QTestState *s)
{
    OK(s, "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
          "{\"type\": \"unix\", \"data\": {\"path\": \"nbd.sock\"}}}}");
}

static void export(QTestState *s, const char *node, const char *name)
{
    OK(s, "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
          "\"nbd\", \"id\": \"%s\", \"node-name\": \"%s\", \"name\": "
          "\"%s\", \"writable\": true}}", name, node, name);
}

static int img_io(QTestState *s, const char *img, const char *cmd)
{
    g_autofree char *out = sh_out(s, "qemu-io -r -U -c '%s' '%s' 2>&1", cmd,
                                  img);

    return qemu_io_good(img, out) ? 0 : 1;
}

static void quit(QTestState *s)
{
    g_autoptr(JsonNode) r = qtest_qmp(s, "{\"execute\": \"quit\"}");
    ck_assert(r && qtest_is_return(r));
    ck_assert_int_eq(qtest_wait_exit(s, 20000), 0);
}

static bool img_clean(QTestState *s, const char *img)
{
    return sh(s, "qemu-img check -q '%s' >/dev/null", img) == 0;
}

/* The node-name → "ro,backing_file" map of query-named-block-nodes,
 * without generated names, as one sorted string. */
static char *graph_state(QTestState *s)
{
    g_autoptr(JsonNode) r = qtest_qmp(
        s, "{\"execute\": \"query-named-block-nodes\", \"arguments\": "
           "{\"flat\": true}}");
    JsonArray *a = json_node_get_array(json_object_get_member(
        json_node_get_object(r), "return"));
    g_autoptr(GPtrArray) items = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(JsonNode) e = qtest_qmp(s,
        "{\"execute\": \"query-block-exports\"}");
    JsonArray *ea = json_node_get_array(json_object_get_member(
        json_node_get_object(e), "return"));
    GString *out = g_string_new(NULL);

    for (guint i = 0; i < json_array_get_length(a); i++) {
        JsonObject *n = json_array_get_object_element(a, i);
        const char *name = json_object_get_string_member(n, "node-name");
        if (name[0] == '#') {
            continue;
        }
        g_ptr_array_add(items, g_strdup_printf(
            "%s:%d:%s", name, json_object_get_boolean_member(n, "ro"),
            json_object_get_string_member_with_default(n, "backing_file",
                                                       "-")));
    }
    for (guint i = 0; i < json_array_get_length(ea); i++) {
        JsonObject *x = json_array_get_object_element(ea, i);
        g_ptr_array_add(items, g_strdup_printf(
            "export %s:%s", json_object_get_string_member(x, "id"),
            json_object_get_string_member(x, "node-name")));
    }
    g_ptr_array_sort(items, cmp_str);
    for (guint i = 0; i < items->len; i++) {
        g_string_append_printf(out, "%s\n", (char *)items->pdata[i]);
    }
    return g_string_free(out, FALSE);
}

/* Names and contents (sha256) of every file in the scratch dir but the
 * sockets and the daemon's log. */
static char *dir_state(QTestState *s)
{
    g_autoptr(GDir) d = g_dir_open(qtest_dir(s), 0, NULL);
    g_autoptr(GPtrArray) items = g_ptr_array_new_with_free_func(g_free);
    GString *out = g_string_new(NULL);
    const char *n;

    while ((n = g_dir_read_name(d))) {
        g_autofree char *p = g_build_filename(qtest_dir(s), n, NULL);
        g_autofree char *data = NULL;
        gsize len = 0;
        if (!g_str_has_suffix(n, ".qcow2")) {
            continue;
        }
        ck_assert(g_file_get_contents(p, &data, &len, NULL));
        g_autofree char *sum = g_compute_checksum_for_data(
            G_CHECKSUM_SHA256, (const guchar *)data, len);
        g_ptr_array_add(items, g_strdup_printf("%s %s", n, sum));
    }
    g_ptr_array_sort(items, cmp_str);
    for (guint i = 0; i < items->len; i++) {
        g_string_append_printf(out, "%s\n", (char *)items->pdata[i]);
    }
    return g_string_free(out, FALSE);
}

static QTestState *start(void)
{
    if (!have_qemu_tools()) {
        return NULL;
    }
    return qtest_start(NULL, true);
}

#define SNAP(node, file, new) \
    "{\"type\": \"blockdev-snapshot-sync\", \"data\": {\"node-name\": " \
    "\"" node "\", \"snapshot-file\": \"" file "\", " \
    "\"snapshot-node-name\": \"" new "\"}}"

/* ------------------------------------------------------------------ */

START_TEST(test_sync_guest_writes)
{
    QTestState *s = start();
    g_autofree char *info = NULL;
    g_autofree char *graph = NULL;

    if (!s) {
        return;
    }
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 4M' base.qcow2 "
                           ">/dev/null"), 0);
    add_qcow2(s, "base", "base.qcow2");
    nbd_start(s);
    export(s, "base", "disk");
    ck_assert(nbd_io(s, "disk", "-c 'write -P 0x22 1M 1M'"));
    OK(s, "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"base\", \"snapshot-file\": \"ov.qcow2\", "
          "\"snapshot-node-name\": \"ov\", \"format\": \"qcow2\"}}");
    /* Written after the reply: in the overlay only. */
    ck_assert(nbd_io(s, "disk", "-c 'write -P 0x33 2M 1M'"));
    ck_assert(nbd_io(s, "disk", "-c 'read -P 0x22 1M 1M'"));
    ck_assert(nbd_io(s, "disk", "-c 'read -P 0x33 2M 1M'"));
    graph = graph_state(s);
    ck_assert_str_eq(graph, "base:1:-\nexport disk:ov\nov:0:base.qcow2\n");

    /* A second layer on the overlay, in a subdirectory: the backing
     * string must resolve from there. */
    ck_assert_int_eq(sh(s, "mkdir sub"), 0);
    OK(s, "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"ov\", \"snapshot-file\": \"sub/ov2.qcow2\", "
          "\"snapshot-node-name\": \"ov2\"}}");
    ck_assert(nbd_io(s, "disk", "-c 'write -P 0x44 3M 1M'"));
    quit(s);

    ck_assert(img_clean(s, "base.qcow2"));
    ck_assert(img_clean(s, "ov.qcow2"));
    ck_assert(img_clean(s, "sub/ov2.qcow2"));
    ck_assert_int_eq(img_io(s, "base.qcow2", "read -P 0x22 1M 1M"), 0);
    ck_assert_int_eq(img_io(s, "base.qcow2", "read -P 0x11 2M 1M"), 0);
    ck_assert_int_eq(img_io(s, "ov.qcow2", "read -P 0x33 2M 1M"), 0);
    ck_assert_int_eq(img_io(s, "ov.qcow2", "read -P 0x11 3M 1M"), 0);
    ck_assert_int_eq(img_io(s, "sub/ov2.qcow2", "read -P 0x44 3M 1M"), 0);
    ck_assert_int_eq(img_io(s, "sub/ov2.qcow2", "read -P 0x33 2M 1M"), 0);
    /* The header names the base as it was given, with its format. */
    info = sh_out(s, "qemu-img info -U --output=json ov.qcow2");
    ck_assert_msg(strstr(info, "\"backing-filename\": \"base.qcow2\""), "%s",
                  info);
    ck_assert(strstr(info, "\"backing-filename-format\": \"qcow2\""));
    g_free(info);
    info = sh_out(s, "qemu-img info -U --output=json sub/ov2.qcow2");
    ck_assert_msg(strstr(info, "\"backing-filename\": \"../ov.qcow2\""),
                  "%s", info);
    ck_assert_int_eq(sh(s, "qemu-img compare -q sub/ov2.qcow2 "
                           "sub/ov2.qcow2"), 0);
    qtest_end(s);
}
END_TEST

START_TEST(test_sync_errors)
{
    QTestState *s = start();
    g_autofree char *before = NULL;
    g_autofree char *after = NULL;

    if (!s) {
        return;
    }
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 a.qcow2 8M && "
                           "qemu-img create -q -f qcow2 taken.qcow2 8M"), 0);
    add_qcow2(s, "a", "a.qcow2");
    nbd_start(s);
    export(s, "a", "a");
    before = dir_state(s);
    FAILS(s, "Cannot find device='' nor node-name='nosuch'",
          "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"nosuch\", \"snapshot-file\": \"x.qcow2\", "
          "\"snapshot-node-name\": \"x\"}}");
    FAILS(s, "Cannot find device='a' nor node-name=''",
          "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"device\": \"a\", \"snapshot-file\": \"x.qcow2\"}}");
    FAILS(s, "New overlay node-name missing",
          "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"a\", \"snapshot-file\": \"x.qcow2\"}}");
    FAILS(s, "New overlay node-name already in use",
          "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"a\", \"snapshot-file\": \"x.qcow2\", "
          "\"snapshot-node-name\": \"a\"}}");
    FAILS(s, "Unknown file format 'nosuchfmt'",
          "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"a\", \"snapshot-file\": \"x.qcow2\", "
          "\"snapshot-node-name\": \"x\", \"format\": \"nosuchfmt\"}}");
    FAILS(s, "Backing file not supported for file format 'raw'",
          "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"a\", \"snapshot-file\": \"x.qcow2\", "
          "\"snapshot-node-name\": \"x\", \"format\": \"raw\"}}");
    FAILS(s, "Could not open 'missing.qcow2'",
          "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"a\", \"snapshot-file\": \"missing.qcow2\", "
          "\"snapshot-node-name\": \"x\", \"mode\": \"existing\"}}");
    /* An existing file is not overwritten. */
    FAILS(s, "Could not create 'taken.qcow2': File exists",
          "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"a\", \"snapshot-file\": \"taken.qcow2\", "
          "\"snapshot-node-name\": \"x\", \"mode\": \"absolute-paths\"}}");
    FAILS(s, "Invalid node-name: '1x'",
          "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"a\", \"snapshot-file\": \"y.qcow2\", "
          "\"snapshot-node-name\": \"1x\"}}");
    after = dir_state(s);
    ck_assert_str_eq(before, after);
    {
        g_autofree char *g = graph_state(s);
        ck_assert_str_eq(g, "a:0:-\nexport a:a\n");
    }
    /* Only the top of a chain can be snapshotted. */
    OK(s, "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"a\", \"snapshot-file\": \"a1.qcow2\", "
          "\"snapshot-node-name\": \"a1\"}}");
    FAILS(s, "Node 'a' is busy: node is used as backing hd of 'a1'",
          "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"a\", \"snapshot-file\": \"a2.qcow2\", "
          "\"snapshot-node-name\": \"a2\"}}");
    ck_assert_int_ne(sh(s, "test -e a2.qcow2"), 0);
    quit(s);
    qtest_end(s);
}
END_TEST

/* A snapshot of a node nothing uses keeps its overlay. */
START_TEST(test_sync_lone)
{
    QTestState *s = start();

    if (!s) {
        return;
    }
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 l.qcow2 8M"), 0);
    add_qcow2(s, "l", "l.qcow2");
    OK(s, "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"l\", \"snapshot-file\": \"l1.qcow2\", "
          "\"snapshot-node-name\": \"l1\"}}");
    {
        g_autofree char *g = graph_state(s);
        ck_assert_str_eq(g, "l1:0:l.qcow2\nl:1:-\n");
    }
    OK(s, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"l1\"}}");
    {
        g_autofree char *g = graph_state(s);
        ck_assert_str_eq(g, "l:1:-\n");
    }
    quit(s);
    ck_assert(img_clean(s, "l1.qcow2"));
    qtest_end(s);
}
END_TEST

START_TEST(test_blockdev_snapshot)
{
    QTestState *s = start();

    if (!s) {
        return;
    }
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 b.qcow2 8M && "
                           "qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 "
                           "o.qcow2 && qemu-img create -q -f qcow2 -b "
                           "b.qcow2 -F qcow2 o3.qcow2 && qemu-img create -q "
                           "-f qcow2 o4.qcow2 8M"), 0);
    add_qcow2(s, "b", "b.qcow2");
    nbd_start(s);
    export(s, "b", "d");
    ck_assert(nbd_io(s, "d", "-c 'write -P 0x51 0 1M'"));
    OK(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"o\", \"backing\": null, \"file\": "
          "{\"driver\": \"file\", \"filename\": \"o.qcow2\"}}}");
    FAILS(s, "Cannot find device='nosuch' nor node-name='nosuch'",
          "{\"execute\": \"blockdev-snapshot\", \"arguments\": {\"node\": "
          "\"b\", \"overlay\": \"nosuch\"}}");
    OK(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"cy\", \"backing\": null, \"file\": "
          "{\"driver\": \"file\", \"filename\": \"o4.qcow2\", "
          "\"locking\": \"off\"}, \"read-only\": true}}");
    FAILS(s, "Making 'cy' a backing child of 'cy' would create a cycle",
          "{\"execute\": \"blockdev-snapshot\", \"arguments\": {\"node\": "
          "\"cy\", \"overlay\": \"cy\"}}");
    OK(s, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"cy\"}}");
    OK(s, "{\"execute\": \"blockdev-snapshot\", \"arguments\": {\"node\": "
          "\"b\", \"overlay\": \"o\"}}");
    ck_assert(nbd_io(s, "d", "-c 'write -P 0x52 1M 1M'"));
    ck_assert(nbd_io(s, "d", "-c 'read -P 0x51 0 1M'"));
    FAILS(s, "Node 'b' is busy: node is used as backing hd of 'o'",
          "{\"execute\": \"blockdev-snapshot\", \"arguments\": {\"node\": "
          "\"b\", \"overlay\": \"o\"}}");
    add_qcow2(s, "o3", "o3.qcow2");
    FAILS(s, "The overlay already has a backing image",
          "{\"execute\": \"blockdev-snapshot\", \"arguments\": {\"node\": "
          "\"o\", \"overlay\": \"o3\"}}");
    OK(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"o4\", \"backing\": null, \"file\": "
          "{\"driver\": \"file\", \"filename\": \"o4.qcow2\"}}}");
    export(s, "o4", "d4");
    FAILS(s, "The overlay is already in use",
          "{\"execute\": \"blockdev-snapshot\", \"arguments\": {\"node\": "
          "\"o\", \"overlay\": \"o4\"}}");
    {
        g_autofree char *g = graph_state(s);
        ck_assert_str_eq(g, "b:1:-\nexport d4:o4\nexport d:o\no3:0:b.qcow2\n"
                            "o4:0:-\no:0:b.qcow2\n");
    }
    quit(s);
    ck_assert(img_clean(s, "o.qcow2"));
    ck_assert_int_eq(img_io(s, "b.qcow2", "read -P 0 1M 1M"), 0);
    ck_assert_int_eq(img_io(s, "o.qcow2", "read -P 0x52 1M 1M"), 0);
    ck_assert_int_eq(img_io(s, "o.qcow2", "read -P 0x51 0 1M"), 0);
    qtest_end(s);
}
END_TEST

/* A transaction failing at each position leaves graph, exports, image
 * files and directory exactly as they were. */
START_TEST(test_transaction_rollback)
{
    static const char *const good[] = {
        SNAP("a", "a1.qcow2", "a1"), SNAP("b", "b1.qcow2", "b1"),
        SNAP("c", "c1.qcow2", "c1"),
    };
    static const struct {
        const char *action, *desc;
    } bad[] = {
        { "{\"type\": \"abort\", \"data\": {}}",
          "Transaction aborted using Abort action" },
        { SNAP("nosuch", "n1.qcow2", "n1"),
          "Cannot find device='' nor node-name='nosuch'" },
        { SNAP("c", "c1.qcow2", "b"),
          "New overlay node-name already in use" },
        { SNAP("c", "taken.qcow2", "t1"),
          "Could not create 'taken.qcow2'" },
        { "{\"type\": \"blockdev-snapshot-internal-sync\", \"data\": "
          "{\"device\": \"c\", \"name\": \"\"}}", "Name is empty" },
    };
    QTestState *s = start();
    g_autofree char *graph0 = NULL;
    g_autofree char *dir0 = NULL;

    if (!s) {
        return;
    }
    ck_assert_int_eq(sh(s, "for d in a b c taken; do qemu-img create -q "
                           "-f qcow2 $d.qcow2 8M || exit 1; done"), 0);
    add_qcow2(s, "a", "a.qcow2");
    add_qcow2(s, "b", "b.qcow2");
    add_qcow2(s, "c", "c.qcow2");
    nbd_start(s);
    export(s, "a", "a");
    export(s, "b", "b");
    export(s, "c", "c");
    graph0 = graph_state(s);
    dir0 = dir_state(s);
    for (unsigned k = 0; k < G_N_ELEMENTS(bad); k++) {
        for (unsigned pos = 0; pos < 3; pos++) {
            GString *acts = g_string_new(NULL);
            for (unsigned i = 0; i < 3; i++) {
                g_string_append_printf(acts, "%s%s", i ? ", " : "",
                                       i == pos ? bad[k].action : good[i]);
            }
            /* The later actions snapshot what earlier ones made. */
            g_autoptr(JsonNode) r = qmpf(
                s, "{\"execute\": \"transaction\", \"arguments\": "
                   "{\"actions\": [%s]}}", acts->str);
            g_string_free(acts, TRUE);
            ck_assert_msg(r && !qtest_is_return(r), "case %u pos %u", k,
                          pos);
            ck_assert_msg(g_str_has_prefix(qtest_error_desc(r), bad[k].desc),
                          "case %u pos %u: %s", k, pos,
                          qtest_error_desc(r));
            g_autofree char *graph = graph_state(s);
            g_autofree char *dir = dir_state(s);
            ck_assert_msg(!strcmp(graph, graph0), "case %u pos %u:\n%s", k,
                          pos, graph);
            ck_assert_msg(!strcmp(dir, dir0), "case %u pos %u:\n%s", k,
                          pos, dir);
        }
    }
    /* An internal snapshot taken by a failed transaction is gone. */
    FAILS(s, "Transaction aborted",
          "{\"execute\": \"transaction\", \"arguments\": {\"actions\": ["
          "{\"type\": \"blockdev-snapshot-internal-sync\", \"data\": "
          "{\"device\": \"a\", \"name\": \"in\"}}, "
          "{\"type\": \"abort\", \"data\": {}}]}}");
    {
        g_autofree char *l = sh_out(s, "qemu-img snapshot -U -l a.qcow2");
        ck_assert_msg(!strstr(l, " in "), "%s", l);
    }
    FAILS(s, "Action 'blockdev-snapshot-sync' does not support Transaction "
             "property completion-mode = grouped",
          "{\"execute\": \"transaction\", \"arguments\": {\"actions\": [" 
          SNAP("a", "a1.qcow2", "a1") "], \"properties\": "
          "{\"completion-mode\": \"grouped\"}}}");
    /* The guest still writes to the old layers. */
    ck_assert(nbd_io(s, "a", "-c 'write -P 0x61 0 64k'"));
    /* And a good transaction works: all three at once. */
    OK(s, "{\"execute\": \"transaction\", \"arguments\": {\"actions\": "
          "[%s, %s, %s, {\"type\": \"blockdev-snapshot-internal-sync\", "
          "\"data\": {\"device\": \"c1\", \"name\": \"in\"}}]}}",
       good[0], good[1], good[2]);
    {
        g_autofree char *g = graph_state(s);
        ck_assert_str_eq(g, "a1:0:a.qcow2\na:1:-\nb1:0:b.qcow2\nb:1:-\n"
                            "c1:0:c.qcow2\nc:1:-\nexport a:a1\nexport b:b1\n"
                            "export c:c1\n");
    }
    OK(s, "{\"execute\": \"transaction\", \"arguments\": {\"actions\": []}}");
    quit(s);
    ck_assert_int_eq(img_io(s, "a.qcow2", "read -P 0x61 0 64k"), 0);
    ck_assert(img_clean(s, "a1.qcow2"));
    ck_assert(img_clean(s, "c1.qcow2"));
    {
        g_autofree char *l = sh_out(s, "qemu-img snapshot -l c1.qcow2");
        ck_assert_msg(strstr(l, " in "), "%s", l);
    }
    qtest_end(s);
}
END_TEST

START_TEST(test_internal)
{
    QTestState *s = start();

    if (!s) {
        return;
    }
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 d.qcow2 8M && "
                           "qemu-img create -q -f raw p.raw 8M"), 0);
    OK(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"d\", \"file\": {\"driver\": "
          "\"file\", \"node-name\": \"df\", \"filename\": \"d.qcow2\"}}}");
    OK(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"raw\", \"node-name\": \"p\", \"file\": {\"driver\": \"file\", "
          "\"filename\": \"p.raw\"}}}");
    nbd_start(s);
    export(s, "d", "d");
    ck_assert(nbd_io(s, "d", "-c 'write -P 0x71 0 1M'"));
    OK(s, "{\"execute\": \"blockdev-snapshot-internal-sync\", \"arguments\": "
          "{\"device\": \"d\", \"name\": \"s1\"}}");
    ck_assert(nbd_io(s, "d", "-c 'write -P 0x72 0 1M'"));
    OK(s, "{\"execute\": \"blockdev-snapshot-internal-sync\", \"arguments\": "
          "{\"device\": \"d\", \"name\": \"s2\"}}");
    FAILS(s, "Snapshot with name 's1' already exists on device 'd'",
          "{\"execute\": \"blockdev-snapshot-internal-sync\", \"arguments\": "
          "{\"device\": \"d\", \"name\": \"s1\"}}");
    FAILS(s, "Name is empty",
          "{\"execute\": \"blockdev-snapshot-internal-sync\", \"arguments\": "
          "{\"device\": \"d\", \"name\": \"\"}}");
    FAILS(s, "Need a root block node",
          "{\"execute\": \"blockdev-snapshot-internal-sync\", \"arguments\": "
          "{\"device\": \"df\", \"name\": \"x\"}}");
    FAILS(s, "Block format 'raw' used by device 'p' does not support "
             "internal snapshots",
          "{\"execute\": \"blockdev-snapshot-internal-sync\", \"arguments\": "
          "{\"device\": \"p\", \"name\": \"x\"}}");
    FAILS(s, "Cannot find device='no' nor node-name='no'",
          "{\"execute\": \"blockdev-snapshot-internal-sync\", \"arguments\": "
          "{\"device\": \"no\", \"name\": \"x\"}}");
    FAILS(s, "Name or id must be provided",
          "{\"execute\": \"blockdev-snapshot-delete-internal-sync\", "
          "\"arguments\": {\"device\": \"d\"}}");
    FAILS(s, "Snapshot with id 'null' and name 'nosuch' does not exist on "
             "device 'd'",
          "{\"execute\": \"blockdev-snapshot-delete-internal-sync\", "
          "\"arguments\": {\"device\": \"d\", \"name\": \"nosuch\"}}");
    FAILS(s, "Snapshot with id '1' and name 's2' does not exist on device "
             "'d'",
          "{\"execute\": \"blockdev-snapshot-delete-internal-sync\", "
          "\"arguments\": {\"device\": \"d\", \"id\": \"1\", "
          "\"name\": \"s2\"}}");
    {
        g_autoptr(JsonNode) r = qtest_qmp(
            s, "{\"execute\": \"blockdev-snapshot-delete-internal-sync\", "
               "\"arguments\": {\"device\": \"d\", \"name\": \"s1\"}}");
        ck_assert(r && qtest_is_return(r));
        JsonObject *o = json_object_get_object_member(
            json_node_get_object(r), "return");
        ck_assert_str_eq(json_object_get_string_member(o, "id"), "1");
        ck_assert_str_eq(json_object_get_string_member(o, "name"), "s1");
        ck_assert_int_eq(json_object_get_int_member(o, "vm-state-size"), 0);
        ck_assert(json_object_has_member(o, "date-sec"));
        ck_assert(!json_object_has_member(o, "icount"));
    }
    /* IDs are not reused after a delete. */
    OK(s, "{\"execute\": \"blockdev-snapshot-internal-sync\", \"arguments\": "
          "{\"device\": \"d\", \"name\": \"s3\"}}");
    OK(s, "{\"execute\": \"blockdev-snapshot-delete-internal-sync\", "
          "\"arguments\": {\"device\": \"d\", \"id\": \"3\"}}");
    quit(s);
    ck_assert(img_clean(s, "d.qcow2"));
    {
        g_autofree char *l = sh_out(s, "qemu-img snapshot -l d.qcow2");
        ck_assert_msg(strstr(l, "s2") && !strstr(l, "s1") &&
                      !strstr(l, "s3"), "%s", l);
    }
    ck_assert_int_eq(sh(s, "qemu-img convert -l snapshot.name=s2 -O raw "
                           "d.qcow2 s2.raw"), 0);
    ck_assert_int_eq(sh(s, "qemu-io -f raw -c 'read -P 0x72 0 1M' s2.raw "
                           "| grep -qv fail"), 0);
    ck_assert_int_eq(img_io(s, "d.qcow2", "read -P 0x72 0 1M"), 0);
    qtest_end(s);
}
END_TEST

START_TEST(test_change_backing_file)
{
    QTestState *s = start();
    g_autofree char *info = NULL;

    if (!s) {
        return;
    }
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 b.qcow2 8M && "
                           "qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 "
                           "t.qcow2 && qemu-img create -q -f qcow2 o0.qcow2 "
                           "8M && qemu-img create -q -f qcow2 -b o0.qcow2 "
                           "-F qcow2 o.qcow2"), 0);
    add_qcow2(s, "t", "t.qcow2");
    add_qcow2(s, "o", "o.qcow2");
    OK(s, "{\"execute\": \"change-backing-file\", \"arguments\": "
          "{\"device\": \"t\", \"image-node-name\": \"t\", "
          "\"backing-file\": \"./b.qcow2\"}}");
    FAILS(s, "'t' and image file are not in the same chain",
          "{\"execute\": \"change-backing-file\", \"arguments\": "
          "{\"device\": \"t\", \"image-node-name\": \"o\", "
          "\"backing-file\": \"x\"}}");
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 n.qcow2 8M"), 0);
    add_qcow2(s, "n", "n.qcow2");
    FAILS(s, "not allowing backing file change on an image without a "
             "backing file",
          "{\"execute\": \"change-backing-file\", \"arguments\": "
          "{\"device\": \"t\", \"image-node-name\": \"n\", "
          "\"backing-file\": \"x\"}}");
    FAILS(s, "Cannot find device='' nor node-name='nosuch'",
          "{\"execute\": \"change-backing-file\", \"arguments\": "
          "{\"device\": \"t\", \"image-node-name\": \"nosuch\", "
          "\"backing-file\": \"x\"}}");
    quit(s);
    info = sh_out(s, "qemu-img info --output=json t.qcow2");
    ck_assert_msg(strstr(info, "\"backing-filename\": \"./b.qcow2\""), "%s",
                  info);
    ck_assert(img_clean(s, "t.qcow2"));
    qtest_end(s);
}
END_TEST

START_TEST(test_revert)
{
    QTestState *s = start();

    if (!s) {
        return;
    }
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 8M"), 0);
    add_qcow2(s, "base", "base.qcow2");
    nbd_start(s);
    export(s, "base", "d");
    ck_assert(nbd_io(s, "d", "-c 'write -P 0x81 0 1M'"));
    OK(s, "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"base\", \"snapshot-file\": \"s1.qcow2\", "
          "\"snapshot-node-name\": \"s1\"}}");
    ck_assert(nbd_io(s, "d", "-c 'write -P 0x82 1M 1M'"));
    OK(s, "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
          "{\"node-name\": \"s1\", \"snapshot-file\": \"s2.qcow2\", "
          "\"snapshot-node-name\": \"s2\"}}");
    ck_assert(nbd_io(s, "d", "-c 'write -P 0x83 2M 1M'"));
    FAILS(s, "New overlay node-name already in use",
          "{\"execute\": \"x-strata-blockdev-revert\", \"arguments\": {\"node\": "
          "\"base\", \"overlay-file\": \"r.qcow2\", \"overlay-node-name\": "
          "\"s1\"}}");
    ck_assert_int_ne(sh(s, "test -e r.qcow2"), 0);
    /* Back to the state when s1 was frozen: 0x82 at 1M, no 0x83. */
    OK(s, "{\"execute\": \"x-strata-blockdev-revert\", \"arguments\": {\"node\": "
          "\"s1\", \"overlay-file\": \"r.qcow2\", \"overlay-node-name\": "
          "\"r\"}}");
    ck_assert(nbd_io(s, "d", "-c 'read -P 0x82 1M 1M'"));
    ck_assert(nbd_io(s, "d", "-c 'read -P 0 2M 1M'"));
    ck_assert(nbd_io(s, "d", "-c 'write -P 0x84 3M 1M'"));
    {
        g_autofree char *g = graph_state(s);
        ck_assert_str_eq(g, "base:1:-\nexport d:r\nr:0:s1.qcow2\n"
                            "s1:1:base.qcow2\n");
    }
    ck_assert_int_eq(sh(s, "test -f s2.qcow2"), 0);
    /* Revert again to the base, deleting what is discarded. */
    OK(s, "{\"execute\": \"x-strata-blockdev-revert\", \"arguments\": {\"node\": "
          "\"base\", \"overlay-file\": \"r2.qcow2\", \"overlay-node-name\": "
          "\"r2\", \"delete-discarded\": true}}");
    ck_assert(nbd_io(s, "d", "-c 'read -P 0x81 0 1M'"));
    ck_assert(nbd_io(s, "d", "-c 'read -P 0 1M 1M'"));
    ck_assert_int_ne(sh(s, "test -e r.qcow2"), 0);
    ck_assert_int_ne(sh(s, "test -e s1.qcow2"), 0);
    ck_assert_int_eq(sh(s, "test -e s2.qcow2"), 0);
    quit(s);
    ck_assert(img_clean(s, "r2.qcow2"));
    ck_assert(img_clean(s, "base.qcow2"));
    ck_assert_int_eq(img_io(s, "r2.qcow2", "read -P 0x81 0 1M"), 0);
    qtest_end(s);
}
END_TEST

int main(void)
{
    if (!have_qemu_tools()) {
        return 77;
    }
    const StrataTestCase tests[] = {
        { "/snapshot/sync-guest-writes", test_sync_guest_writes },
        { "/snapshot/sync-errors", test_sync_errors },
        { "/snapshot/sync-lone", test_sync_lone },
        { "/snapshot/blockdev-snapshot", test_blockdev_snapshot },
        { "/snapshot/transaction-rollback", test_transaction_rollback },
        { "/snapshot/internal", test_internal },
        { "/snapshot/change-backing-file", test_change_backing_file },
        { "/snapshot/revert", test_revert },
    };

    return strata_test_main("snapshot", tests, NULL, NULL);
}
