/* qtest: the mirror_top filter node that blockdev-mirror, drive-mirror
 * and active block-commit put above their source, as QEMU does: listed
 * under filter-node-name (or an automatic '#' name) while the job runs,
 * guest writes over NBD going through it, gone after every ending
 * (complete, cancel before and after READY, an error); bad names are
 * refused and the filter counts as busy for other jobs. */
#include <check.h>
#include <string.h>
#include <glib.h>

#include "libqtest.h"
#include "job-helpers.h"
#include "../unit/test-util.h"

/* s0 <- s1 (the guest's disk, exported as "disk"), t.qcow2 and
 * t2.qcow2 empty images of its size; ref.raw is what the guest sees. */
static void setup_chain(QTestState *s)
{
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 s0.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 6M' s0.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "s0.qcow2 s1.qcow2 && "
                           "qemu-io -c 'write -P 0x22 4M 4M' s1.qcow2 && "
                           "qemu-img convert -O raw s1.qcow2 ref.raw && "
                           "qemu-img create -q -f qcow2 t.qcow2 16M && "
                           "qemu-img create -q -f qcow2 t2.qcow2 16M "
                           ">/dev/null"), 0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"s0\", \"read-only\": true, "
          "\"file\": {\"driver\": \"file\", \"filename\": \"s0.qcow2\"}}}");
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"s1\", \"backing\": \"s0\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"s1.qcow2\"}}}");
    ok(s, "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
          "{\"type\": \"unix\", \"data\": {\"path\": \"nbd.sock\"}}}}");
    ok(s, "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
          "\"nbd\", \"id\": \"e\", \"node-name\": \"s1\", \"name\": "
          "\"disk\", \"writable\": true}}");
}

static void add_target(QTestState *s, const char *name, const char *file)
{
    g_autofree char *req = g_strdup_printf(
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"qcow2\", \"node-name\": \"%s\", \"file\": {\"driver\": "
        "\"file\", \"filename\": \"%s\"}}}", name, file);
    ok(s, req);
}

/* The filter is listed as @want ("#": any automatic name). */
static void filter_is(QTestState *s, const char *want)
{
    g_autofree char *name = node_of_driver(s, "mirror_top");

    if (!strcmp(want, "#")) {
        ck_assert_msg(name && name[0] == '#', "mirror_top node: %s",
                      name ? name : "(none)");
    } else {
        ck_assert_str_eq(name ? name : "(none)", want);
    }
}

/* QEMU answers a filter's image info from the image it filters: the same
 * file, cluster size and allocated size as @source's entry, its own
 * format name, and a clean dirty flag. */
static void filter_image_is_sources(QTestState *s, const char *source)
{
    g_autoptr(JsonNode) r = qtest_qmp(
        s, "{\"execute\": \"query-named-block-nodes\", \"arguments\": "
           "{\"flat\": true}}");
    JsonArray *a = json_node_get_array(json_object_get_member(
        json_node_get_object(r), "return"));
    JsonObject *fi = NULL, *si = NULL;

    for (guint i = 0; i < json_array_get_length(a); i++) {
        JsonObject *n = json_array_get_object_element(a, i);
        if (!strcmp(json_object_get_string_member(n, "drv"), "mirror_top")) {
            fi = json_object_get_object_member(n, "image");
        } else if (!strcmp(json_object_get_string_member(n, "node-name"),
                           source)) {
            si = json_object_get_object_member(n, "image");
        }
    }
    ck_assert(fi && si);
    ck_assert_str_eq(json_object_get_string_member(fi, "format"),
                     "mirror_top");
    ck_assert_str_eq(json_object_get_string_member(fi, "filename"),
                     json_object_get_string_member(si, "filename"));
    ck_assert(json_object_has_member(si, "actual-size"));
    ck_assert_int_eq(json_object_get_int_member(fi, "cluster-size"),
                     json_object_get_int_member(si, "cluster-size"));
    ck_assert_int_eq(json_object_get_int_member(fi, "actual-size"),
                     json_object_get_int_member(si, "actual-size"));
    ck_assert(!json_object_get_boolean_member(fi, "dirty-flag"));
}

/* x-debug-query-block-graph names the edge from the filter @filter to
 * @source "backing", as QEMU does for the filters it appends. */
static void filter_edge_is_backing(QTestState *s, const char *filter,
                                   const char *source)
{
    g_autoptr(JsonNode) r = qtest_qmp(
        s, "{\"execute\": \"x-debug-query-block-graph\"}");
    JsonObject *g = json_object_get_object_member(
        json_node_get_object(r), "return");
    JsonArray *nodes = json_object_get_array_member(g, "nodes");
    JsonArray *edges = json_object_get_array_member(g, "edges");
    gint64 fid = -1, sid = -1;
    const char *name = NULL;

    for (guint i = 0; i < json_array_get_length(nodes); i++) {
        JsonObject *n = json_array_get_object_element(nodes, i);
        const char *nn = json_object_get_string_member(n, "name");
        if (!strcmp(nn, filter)) {
            fid = json_object_get_int_member(n, "id");
        } else if (!strcmp(nn, source)) {
            sid = json_object_get_int_member(n, "id");
        }
    }
    for (guint i = 0; i < json_array_get_length(edges); i++) {
        JsonObject *e = json_array_get_object_element(edges, i);
        if (json_object_get_int_member(e, "parent") == fid &&
            json_object_get_int_member(e, "child") == sid) {
            name = json_object_get_string_member(e, "name");
        }
    }
    ck_assert_str_eq(name ? name : "(no edge)", "backing");
}

static void filter_gone(QTestState *s)
{
    g_autofree char *name = node_of_driver(s, "mirror_top");
    ck_assert_msg(!name, "mirror_top node %s left behind", name);
}

static void guest_sees_ref(QTestState *s)
{
    ck_assert_int_eq(sh(s, "qemu-img compare -q -f raw -F raw ref.raw "
                           "'nbd+unix:///disk?socket=nbd.sock'"), 0);
}

/* @job ended without a pivot: gone, its filter too, the export still
 * on s1. */
static void ended_without_pivot(QTestState *s, const char *job)
{
    reach_status(s, job, "null");
    filter_gone(s);
    export_is(s, "s1");
}

/* Completes @job (READY): the filter goes, the export moves to @node,
 * the guest writes once more (@write, a qemu-io command) and reads what
 * it expects, and after quit the image file @file holds it too. */
static void complete_onto(QTestState *s, const char *job, const char *node,
                          const char *file, const char *write)
{
    g_autofree char *req = g_strdup_printf(
        "{\"execute\": \"block-job-complete\", \"arguments\": "
        "{\"device\": \"%s\"}}", job);

    ok(s, req);
    reach_status(s, job, "null");
    filter_gone(s);
    export_is(s, node);
    ck_assert_int_eq(guest_io(s, write), 0);
    guest_sees_ref(s);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 20000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw %s ref.raw", file),
                     0);
    qtest_end(s);
}

/* Active commit s1 -> s0 with a named filter: listed while the job runs
 * (READY included), the guest writes through it, gone after complete
 * with the export on s0. */
START_TEST(test_active_commit_filter)
{
    QTestState *s;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    setup_chain(s);
    ok(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
          "\"ac\", \"device\": \"s1\", \"filter-node-name\": \"acf\", "
          "\"speed\": 65536}}");
    filter_is(s, "acf");
    filter_image_is_sources(s, "s1");
    filter_edge_is_backing(s, "acf", "s1");
    ck_assert_int_eq(guest_io(s, "write -P 0x51 10M 256k"), 0);
    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"ac\", \"speed\": 0}}");
    reach_status(s, "ac", "ready");
    filter_is(s, "acf");
    ck_assert_int_eq(guest_io(s, "write -P 0x52 11M 64k"), 0);
    complete_onto(s, "ac", "s0", "s0.qcow2", "write -P 0x53 12M 64k");
}
END_TEST

/* blockdev-mirror ended every way, one after the other on one source:
 * the filter is gone each time and the guest keeps writing. */
START_TEST(test_mirror_filter_endings)
{
    QTestState *s;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    setup_chain(s);
    add_target(s, "t", "t.qcow2");

    /* Cancelled before READY (held back by a speed limit); automatic
     * name. */
    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
          "\"full\", \"speed\": 65536}}");
    filter_is(s, "#");
    ck_assert_int_eq(guest_io(s, "write -P 0x61 1M 64k"), 0);
    ok(s, "{\"execute\": \"block-job-cancel\", \"arguments\": "
          "{\"device\": \"m\"}}");
    json_node_unref(want_event(s, "BLOCK_JOB_CANCELLED"));
    ended_without_pivot(s, "m");

    /* Cancelled in READY: no pivot. */
    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
          "\"full\", \"filter-node-name\": \"mf\"}}");
    reach_status(s, "m", "ready");
    filter_is(s, "mf");
    ck_assert_int_eq(guest_io(s, "write -P 0x62 2M 64k"), 0);
    ok(s, "{\"execute\": \"block-job-cancel\", \"arguments\": "
          "{\"device\": \"m\"}}");
    json_node_unref(want_event(s, "BLOCK_JOB_COMPLETED"));
    ended_without_pivot(s, "m");

    /* An error on the target with the report policy ends the job. */
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"blkdebug\", \"node-name\": \"dbg\", \"inject-error\": "
          "[{\"event\": \"write_aio\", \"errno\": 5}], \"image\": "
          "{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", "
          "\"filename\": \"t2.qcow2\"}}}}");
    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"s1\", \"target\": \"dbg\", \"sync\": "
          "\"full\", \"filter-node-name\": \"mf\"}}");
    {
        g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_COMPLETED");
        ck_assert(json_object_has_member(data_of(c), "error"));
    }
    ended_without_pivot(s, "m");

    /* Completed: the export follows the target; the name is free
     * again for the next job. */
    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
          "\"full\", \"filter-node-name\": \"mf\"}}");
    reach_status(s, "m", "ready");
    filter_is(s, "mf");
    ck_assert_int_eq(guest_io(s, "write -P 0x63 3M 64k"), 0);
    complete_onto(s, "m", "t", "t.qcow2", "write -P 0x64 4M 64k");
}
END_TEST

/* filter-node-name taken or malformed: refused before anything starts,
 * for mirror and active commit alike; while a job runs, its filter is
 * busy for other jobs and the source is no root node any more. */
START_TEST(test_filter_name_errors)
{
    QTestState *s;
    g_autoptr(JsonNode) jobs = NULL;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    setup_chain(s);
    add_target(s, "t", "t.qcow2");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"filter-node-name\": \"s0\"}}", "GenericError",
          "Duplicate nodes with node-name='s0'");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"filter-node-name\": \"#f\"}}", "GenericError",
          NULL);
    fails(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
             "\"ac\", \"device\": \"s1\", \"filter-node-name\": \"t\"}}",
          "GenericError", "Duplicate nodes with node-name='t'");
    fails(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
             "\"ac\", \"device\": \"s1\", \"filter-node-name\": \"a b\"}}",
          "GenericError", NULL);
    filter_gone(s);
    jobs = qtest_qmp(s, "{\"execute\": \"query-jobs\"}");
    ck_assert_int_eq(json_array_get_length(json_node_get_array(
        json_object_get_member(json_node_get_object(jobs), "return"))), 0);

    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
          "\"full\", \"filter-node-name\": \"mf\", \"speed\": 65536}}");
    filter_is(s, "mf");
    /* A node of that name exists now. */
    fails(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
             "\"qcow2\", \"node-name\": \"mf\", \"file\": {\"driver\": "
             "\"file\", \"filename\": \"t2.qcow2\"}}}", "GenericError",
          NULL);
    fails(s, "{\"execute\": \"drive-mirror\", \"arguments\": {\"job-id\": "
             "\"m2\", \"device\": \"mf\", \"target\": \"x.qcow2\", "
             "\"sync\": \"full\"}}", "GenericError",
          "Node 'mf' is busy: block device is in use by block job: mirror");
    fails(s, "{\"execute\": \"drive-mirror\", \"arguments\": {\"job-id\": "
             "\"m2\", \"device\": \"s1\", \"target\": \"x.qcow2\", "
             "\"sync\": \"full\"}}", "GenericError",
          "Need a root block node");
    ok(s, "{\"execute\": \"block-job-cancel\", \"arguments\": "
          "{\"device\": \"m\"}}");
    reach_status(s, "m", "null");
    filter_gone(s);
    qtest_end(s);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/mirror-filter/active-commit", test_active_commit_filter },
        { "/mirror-filter/endings", test_mirror_filter_endings },
        { "/mirror-filter/name-errors", test_filter_name_errors },
    };

    return strata_test_main("mirror-filter", tests, NULL, NULL);
}
