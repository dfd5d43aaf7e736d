/* qtest: the mirror engine against stratad — active block-commit (READY,
 * complete with the export following, cancel in READY), blockdev-mirror
 * and drive-mirror with a guest writing over NBD during the copy
 * (checked with qemu-img compare and check), and argument errors. */
#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>

#include "libqtest.h"
#include "job-helpers.h"

static void nbd_export(QTestState *s, const char *node)
{
    g_autofree char *req = g_strdup_printf(
        "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
        "\"nbd\", \"id\": \"e\", \"node-name\": \"%s\", \"name\": "
        "\"disk\", \"writable\": true}}", node);

    ok(s, "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
          "{\"type\": \"unix\", \"data\": {\"path\": \"nbd.sock\"}}}}");
    ok(s, req);
}

/* base <- mid <- top (libvirt style: lower layers read-only), top
 * exported; ref.raw is what the guest sees. */
static void chain3(QTestState *s)
{
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 8M' base.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "base.qcow2 mid.qcow2 && "
                           "qemu-io -c 'write -P 0x22 4M 4M' mid.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "mid.qcow2 top.qcow2 && "
                           "qemu-io -c 'write -P 0x33 6M 1M' top.qcow2 && "
                           "qemu-img convert -O raw top.qcow2 ref.raw "
                           ">/dev/null"), 0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"base\", \"read-only\": true, "
          "\"file\": {\"driver\": \"file\", \"filename\": \"base.qcow2\"}}}");
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"mid\", \"read-only\": true, "
          "\"backing\": \"base\", \"file\": {\"driver\": \"file\", "
          "\"filename\": \"mid.qcow2\"}}}");
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"top\", \"backing\": \"mid\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"top.qcow2\"}}}");
    nbd_export(s, "top");
}

/* After READY: the events up to null, BLOCK_JOB_COMPLETED of @type
 * without error (a soft cancel reports completion too). */
static void finish_events(QTestState *s, const char *id, const char *type)
{
    want_status(s, id, "waiting");
    want_status(s, id, "pending");
    {
        g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_COMPLETED");
        ck_assert(!json_object_has_member(data_of(c), "error"));
        ck_assert_str_eq(json_object_get_string_member(data_of(c), "type"),
                         type);
        ck_assert_int_eq(json_object_get_int_member(data_of(c), "offset"),
                         json_object_get_int_member(data_of(c), "len"));
    }
    want_status(s, id, "concluded");
    want_status(s, id, "null");
}

static void reach_ready(QTestState *s, const char *id, const char *type)
{
    g_autoptr(JsonNode) r = NULL;

    reach_status(s, id, "ready");
    r = want_event(s, "BLOCK_JOB_READY");
    ck_assert_str_eq(json_object_get_string_member(data_of(r), "type"),
                     type);
}

START_TEST(test_active_commit_complete)
{
    QTestState *s = qtest_start(NULL, true);

    if (!have_qemu_tools()) {
        qtest_end(s);
        return;
    }
    chain3(s);
    ok(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
          "\"ac\", \"device\": \"top\", \"speed\": 65536}}");
    reach_status(s, "ac", "running");
    ck_assert_int_eq(guest_io(s, "write -P 0x51 10M 1M"), 0);
    /* not READY before complete is accepted */
    fails(s, "{\"execute\": \"block-job-complete\", \"arguments\": "
             "{\"device\": \"ac\"}}", "GenericError",
          "Job 'ac' in state 'running' cannot accept command verb "
          "'complete'");
    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"ac\", \"speed\": 0}}");
    reach_ready(s, "ac", "commit");
    ck_assert_int_eq(guest_io(s, "write -P 0x52 11M 512k"), 0);
    ok(s, "{\"execute\": \"block-job-complete\", \"arguments\": "
          "{\"device\": \"ac\"}}");
    finish_events(s, "ac", "commit");
    export_is(s, "base");
    ck_assert_int_eq(guest_io(s, "write -P 0x53 14M 1M"), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -f raw -F raw ref.raw "
                           "'nbd+unix:///disk?socket=nbd.sock'"), 0);
    ok(s, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"top\"}}");
    ok(s, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"mid\"}}");
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw base.qcow2 ref.raw"),
                     0);
    ck_assert_int_eq(sh(s, "qemu-img check -q base.qcow2 && qemu-img check "
                           "-q mid.qcow2 && qemu-img check -q top.qcow2"),
                     0);
    qtest_end(s);
}
END_TEST

START_TEST(test_active_commit_cancel_ready)
{
    QTestState *s = qtest_start(NULL, true);

    if (!have_qemu_tools()) {
        qtest_end(s);
        return;
    }
    chain3(s);
    ok(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
          "\"ac\", \"device\": \"top\"}}");
    reach_ready(s, "ac", "commit");
    ck_assert_int_eq(guest_io(s, "write -P 0x52 11M 512k"), 0);
    ok(s, "{\"execute\": \"block-job-cancel\", \"arguments\": "
          "{\"device\": \"ac\"}}");
    finish_events(s, "ac", "commit");
    ck_assert_int_eq(sh(s, "cp ref.raw at-cancel.raw"), 0);
    export_is(s, "top");
    ck_assert_int_eq(guest_io(s, "write -P 0x61 12M 1M"), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -f raw -F raw ref.raw "
                           "'nbd+unix:///disk?socket=nbd.sock'"), 0);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    /* base holds everything up to the cancel; top stays on top */
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw base.qcow2 "
                           "at-cancel.raw"), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw top.qcow2 ref.raw"),
                     0);
    ck_assert_int_eq(sh(s, "qemu-img info top.qcow2 | grep -q "
                           "'backing file: mid.qcow2'"), 0);
    ck_assert_int_eq(sh(s, "qemu-img check -q base.qcow2"), 0);
    qtest_end(s);
}
END_TEST

/* A two-layer source (s0 <- s1, exported) and an empty target. */
static void source2(QTestState *s)
{
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 s0.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 6M' s0.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "s0.qcow2 s1.qcow2 && "
                           "qemu-io -c 'write -P 0x22 4M 4M' s1.qcow2 && "
                           "qemu-img convert -O raw s1.qcow2 ref.raw && "
                           "qemu-img create -q -f qcow2 t.qcow2 16M "
                           ">/dev/null"), 0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"s0\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"s0.qcow2\"}}}");
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"s1\", \"backing\": \"s0\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"s1.qcow2\"}}}");
    nbd_export(s, "s1");
}

START_TEST(test_blockdev_mirror_guest_writes)
{
    QTestState *s = qtest_start(NULL, true);
    JsonNode *keep = NULL;

    if (!have_qemu_tools()) {
        qtest_end(s);
        return;
    }
    source2(s);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"t\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"t.qcow2\"}}}");
    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
          "\"full\", \"speed\": 65536}}");
    reach_status(s, "m", "running");
    ck_assert_int_eq(guest_io(s, "write -P 0x33 1M 1M"), 0);
    ck_assert_int_eq(guest_io(s, "write -P 0x34 12M 2M"), 0);
    ck_assert_int_eq(guest_io(s, "write -P 0x35 5M 4k"), 0);
    {
        JsonObject *j = block_job(s, &keep);
        ck_assert_str_eq(json_object_get_string_member(j, "type"), "mirror");
        ck_assert(!json_object_get_boolean_member(j, "ready"));
        json_node_unref(keep);
    }
    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"m\", \"speed\": 0}}");
    reach_ready(s, "m", "mirror");
    ck_assert_int_eq(guest_io(s, "write -P 0x36 7M 1M"), 0);
    ok(s, "{\"execute\": \"block-job-complete\", \"arguments\": "
          "{\"device\": \"m\"}}");
    finish_events(s, "m", "mirror");
    export_is(s, "t");
    ck_assert_int_eq(guest_io(s, "write -P 0x37 15M 1M"), 0);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw t.qcow2 ref.raw"), 0);
    ck_assert_int_eq(sh(s, "! qemu-img info t.qcow2 | grep -q backing"), 0);
    ck_assert_int_eq(sh(s, "qemu-img check -q t.qcow2 && qemu-img check -q "
                           "s1.qcow2"), 0);
    qtest_end(s);
}
END_TEST

START_TEST(test_drive_mirror_write_blocking)
{
    QTestState *s = qtest_start(NULL, true);

    if (!have_qemu_tools()) {
        qtest_end(s);
        return;
    }
    source2(s);
    ok(s, "{\"execute\": \"drive-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"s1\", \"target\": \"new.qcow2\", "
          "\"format\": \"qcow2\", \"node-name\": \"new\", \"sync\": "
          "\"full\", \"copy-mode\": \"write-blocking\"}}");
    reach_ready(s, "m", "mirror");
    ck_assert_int_eq(guest_io(s, "write -P 0x44 2M 1M"), 0);
    ok(s, "{\"execute\": \"block-job-complete\", \"arguments\": "
          "{\"device\": \"m\"}}");
    finish_events(s, "m", "mirror");
    export_is(s, "new");
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw new.qcow2 ref.raw"),
                     0);
    ck_assert_int_eq(sh(s, "qemu-img check -q new.qcow2"), 0);
    qtest_end(s);
}
END_TEST

START_TEST(test_drive_mirror_top)
{
    QTestState *s = qtest_start(NULL, true);

    if (!have_qemu_tools()) {
        qtest_end(s);
        return;
    }
    source2(s);
    ok(s, "{\"execute\": \"drive-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"s1\", \"target\": \"shallow.qcow2\", "
          "\"node-name\": \"shallow\", \"sync\": \"top\"}}");
    reach_ready(s, "m", "mirror");
    ok(s, "{\"execute\": \"block-job-complete\", \"arguments\": "
          "{\"device\": \"m\"}}");
    finish_events(s, "m", "mirror");
    ck_assert_int_eq(sh(s, "qemu-img compare -q -f raw -F raw ref.raw "
                           "'nbd+unix:///disk?socket=nbd.sock'"), 0);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    /* only the top's data was copied; the backing is the source's */
    ck_assert_int_eq(sh(s, "qemu-img info shallow.qcow2 | grep -q "
                           "'backing file: .*s0.qcow2'"), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw shallow.qcow2 "
                           "ref.raw"), 0);
    qtest_end(s);
}
END_TEST

START_TEST(test_mirror_errors)
{
    QTestState *s = qtest_start(NULL, true);

    if (!have_qemu_tools()) {
        qtest_end(s);
        return;
    }
    source2(s);
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 small.qcow2 1M"), 0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"t\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"t.qcow2\"}}}");
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"small\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"small.qcow2\"}}}");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"nope\", \"target\": \"t\", \"sync\": "
             "\"full\"}}", "GenericError",
          "Cannot find device='nope' nor node-name='nope'");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"nope\", \"sync\": "
             "\"full\"}}", "GenericError",
          "Cannot find device='nope' nor node-name='nope'");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"s1\", \"sync\": "
             "\"full\"}}", "GenericError", "Can't mirror node into itself");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"s0\", \"sync\": "
             "\"full\"}}", "GenericError",
          "Node 's0' is busy: node is used as backing hd of 's1'");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s0\", \"target\": \"t\", \"sync\": "
             "\"full\"}}", "GenericError", "Need a root block node");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"incremental\"}}", "GenericError",
          "Sync mode 'incremental' not supported");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"granularity\": 1000}}", "GenericError",
          "Parameter 'granularity' expects a power of 2");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"granularity\": 256}}", "GenericError",
          "Parameter 'granularity' expects a value in range [512B, 64MB]");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"buf-size\": -1}}", "GenericError",
          "Invalid parameter 'buf-size'");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"replaces\": \"nope\"}}", "GenericError",
          "Failed to find node with node-name='nope'");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"replaces\": \"small\"}}", "GenericError",
          "Cannot replace 'small' by a node mirrored from 's1', because it "
          "cannot be guaranteed that doing so would not lead to an abrupt "
          "change of visible data");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"filter-node-name\": \"s0\"}}", "GenericError",
          "Duplicate nodes with node-name='s0'");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"filter-node-name\": \"a b\"}}", "GenericError",
          "Invalid node-name: 'a b'");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"granularity\": 134217728}}", "GenericError",
          "Parameter 'granularity' expects a value in range [512B, 64MB]");
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"on-target-error\": \"sometimes\"}}",
          "GenericError", NULL);
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
             "\"full\", \"copy-mode\": \"eager\"}}", "GenericError", NULL);
    fails(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"t\"}}",
          "GenericError", "Parameter 'sync' is missing");
    /* drive-mirror's own arguments; no file is left behind */
    fails(s, "{\"execute\": \"drive-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"r.qcow2\", "
             "\"sync\": \"full\", \"replaces\": \"s1\"}}", "GenericError",
          "a node-name must be provided when replacing a named node of the "
          "graph");
    fails(s, "{\"execute\": \"drive-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"r.qcow2\", "
             "\"sync\": \"full\", \"format\": \"vmdk9\"}}", "GenericError",
          "Unknown file format 'vmdk9'");
    fails(s, "{\"execute\": \"drive-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"r.qcow2\", "
             "\"sync\": \"full\", \"node-name\": \"t\"}}", "GenericError",
          "Duplicate nodes with node-name='t'");
    fails(s, "{\"execute\": \"drive-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"missing.qcow2\", "
             "\"format\": \"qcow2\", \"sync\": \"full\", \"mode\": "
             "\"existing\"}}", "GenericError",
          "Could not open 'missing.qcow2': No such file or directory");
    fails(s, "{\"execute\": \"drive-mirror\", \"arguments\": {\"job-id\": "
             "\"m\", \"device\": \"s1\", \"target\": \"r.qcow2\", "
             "\"sync\": \"full\", \"mode\": \"relative\"}}", "GenericError",
          NULL);
    ck_assert_int_eq(sh(s, "test ! -e r.qcow2 && test ! -e missing.qcow2"),
                     0);
    /* a target of another size: accepted, the job fails (as QEMU's) */
    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"sz\", \"device\": \"s1\", \"target\": \"small\", \"sync\": "
          "\"full\"}}");
    {
        g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_COMPLETED");
        ck_assert_str_eq(json_object_get_string_member(data_of(c), "error"),
                         "Source and target image have different sizes");
    }
    reach_status(s, "sz", "null");
    /* busy: a second job on the mirrored node */
    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
          "\"none\"}}");
    reach_ready(s, "m", "mirror");
    /* s1 is under the job's filter now: no root node, as in QEMU */
    fails(s, "{\"execute\": \"drive-mirror\", \"arguments\": {\"job-id\": "
             "\"m2\", \"device\": \"s1\", \"target\": \"x.qcow2\", "
             "\"sync\": \"full\"}}", "GenericError",
          "Need a root block node");
    /* a forced cancel in READY is a cancel */
    ok(s, "{\"execute\": \"block-job-cancel\", \"arguments\": "
          "{\"device\": \"m\", \"force\": true}}");
    {
        g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_CANCELLED");
        ck_assert_str_eq(json_object_get_string_member(data_of(c), "type"),
                         "mirror");
    }
    qtest_end(s);
}
END_TEST

/* A guest writing 4 KiB random writes as fast as it can during the
 * whole copy: the job must still reach READY (liveness: the event
 * waits are generous, nothing is timed), and the pivoted target holds
 * every write. */
START_TEST(test_mirror_busy_guest_converges)
{
    QTestState *s = qtest_start(NULL, true);
    GString *cmds = g_string_new(NULL);
    g_autofree char *writer = NULL;

    if (!have_qemu_tools()) {
        qtest_end(s);
        g_string_free(cmds, TRUE);
        return;
    }
    source2(s);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"t\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"t.qcow2\"}}}");
    /* 3000 scattered writes in one client, in the background */
    for (unsigned i = 0; i < 3000; i++) {
        g_string_append_printf(cmds, "-c 'write -P 0x%02x %u 4k' ",
                               0x40 + i % 64,
                               ((i * 2654435761u) % 4096) * 4096);
    }
    writer = g_strdup_printf("(qemu-io -f raw %s "
                             "'nbd+unix:///disk?socket=nbd.sock' "
                             ">/dev/null 2>&1; touch writer.done) &",
                             cmds->str);
    g_string_free(cmds, TRUE);
    ck_assert_int_eq(sh(s, "%s", writer), 0);
    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"s1\", \"target\": \"t\", \"sync\": "
          "\"full\", \"granularity\": 4096, \"buf-size\": 65536}}");
    reach_ready(s, "m", "mirror");
    /* READY stays true while the guest keeps writing */
    ck_assert_int_eq(sh(s, "for i in $(seq 600); do test -e writer.done "
                           "&& exit 0; sleep 0.1; done; exit 1"), 0);
    ok(s, "{\"execute\": \"block-job-complete\", \"arguments\": "
          "{\"device\": \"m\"}}");
    finish_events(s, "m", "mirror");
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q s1.qcow2 t.qcow2"), 0);
    ck_assert_int_eq(sh(s, "qemu-img check -q t.qcow2"), 0);
    qtest_end(s);
}
END_TEST

/* One failed request through blkdebug on the target (write) or the
 * source (read) under each policy: BLOCK_JOB_ERROR names the action;
 * report fails the job, stop pauses it (io-status failed, or nospace
 * for ENOSPC) and resume goes on, ignore goes on; every job that goes
 * on pivots a target equal to the source. */
typedef struct PolicyCase {
    bool source;            /* the error is a source read */
    const char *policy;
    int errnum;
    const char *action;     /* BLOCK_JOB_ERROR's action */
    const char *io_status;  /* while stopped */
    const char *event;      /* blkdebug event; NULL: the read or write */
} PolicyCase;

static const PolicyCase policy_cases[] = {
    { false, "report", 5, "report", NULL },
    { false, "stop", 5, "stop", "failed" },
    { false, "ignore", 5, "ignore", NULL },
    { false, "enospc", 28, "stop", "nospace" },
    { false, "enospc", 5, "report", NULL },
    { false, "auto", 28, "stop", "nospace" },
    { true, "report", 5, "report", NULL },
    { true, "stop", 5, "stop", "failed" },
    { true, "ignore", 5, "ignore", NULL },
    /* The target's flush before READY. */
    { false, "report", 5, "report", NULL, "flush_to_disk" },
    { false, "stop", 5, "stop", "failed", "flush_to_disk" },
};

static void run_policy_case(const PolicyCase *pc)
{
    QTestState *s = qtest_start(NULL, true);
    JsonNode *keep = NULL;
    g_autofree char *dbg = NULL;
    g_autofree char *mirror = NULL;

    source2(s);
    dbg = g_strdup_printf(
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"blkdebug\", \"node-name\": \"dbg\", \"inject-error\": "
        "[{\"event\": \"%s\", \"errno\": %d, \"once\": true}], "
        "\"image\": %s}}",
        pc->event ? pc->event : pc->source ? "read_aio" : "write_aio",
        pc->errnum, pc->source ? "\"s1\"" :
        "{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", "
        "\"filename\": \"t.qcow2\"}}");
    ok(s, dbg);
    if (pc->source) {
        ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"qcow2\", \"node-name\": \"t\", \"file\": {\"driver\": "
              "\"file\", \"filename\": \"t.qcow2\"}}}");
    }
    mirror = g_strdup_printf(
        "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
        "\"m\", \"device\": \"%s\", \"target\": \"%s\", \"sync\": "
        "\"full\", \"%s\": \"%s\"}}", pc->source ? "dbg" : "s1",
        pc->source ? "t" : "dbg",
        pc->source ? "on-source-error" : "on-target-error", pc->policy);
    ok(s, mirror);
    {
        g_autoptr(JsonNode) ev = want_event(s, "BLOCK_JOB_ERROR");
        ck_assert_str_eq(json_object_get_string_member(data_of(ev),
                                                       "operation"),
                         pc->source ? "read" : "write");
        ck_assert_msg(!strcmp(json_object_get_string_member(data_of(ev),
                                                            "action"),
                              pc->action), "%s/%s/%d: action %s",
                      pc->source ? "source" : "target", pc->policy,
                      pc->errnum, json_object_get_string_member(
                          data_of(ev), "action"));
    }
    if (!strcmp(pc->action, "report")) {
        g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_COMPLETED");
        ck_assert(json_object_has_member(data_of(c), "error"));
        export_is(s, "s1");
        qtest_end(s);
        return;
    }
    if (!strcmp(pc->action, "stop")) {
        reach_status(s, "m", "paused");
        ck_assert_str_eq(json_object_get_string_member(block_job(s, &keep),
                                                       "io-status"),
                         pc->io_status);
        json_node_unref(keep);
        ok(s, "{\"execute\": \"block-job-resume\", \"arguments\": "
              "{\"device\": \"m\"}}");
    }
    reach_ready(s, "m", "mirror");
    ok(s, "{\"execute\": \"block-job-complete\", \"arguments\": "
          "{\"device\": \"m\"}}");
    reach_status(s, "m", "null");
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw t.qcow2 ref.raw"), 0);
    qtest_end(s);
}

START_TEST(test_mirror_error_policies)
{
    if (!have_qemu_tools()) {
        return;
    }
    run_policy_case(&policy_cases[_i]);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("mirror");
    TCase *tc = tcase_create("mirror");
    TCase *tcp;
    SRunner *sr;
    int failed;

    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_active_commit_complete);
    tcase_add_test(tc, test_active_commit_cancel_ready);
    tcase_add_test(tc, test_blockdev_mirror_guest_writes);
    tcase_add_test(tc, test_drive_mirror_write_blocking);
    tcase_add_test(tc, test_drive_mirror_top);
    tcase_add_test(tc, test_mirror_errors);
    tcase_add_test(tc, test_mirror_busy_guest_converges);
    suite_add_tcase(suite, tc);
    /* A case of its own: meson runs it as a second test, in parallel
     * (CK_RUN_CASE). */
    tcp = tcase_create("policies");
    tcase_set_timeout(tcp, 120);
    tcase_add_loop_test(tcp, test_mirror_error_policies, 0,
                        G_N_ELEMENTS(policy_cases));
    suite_add_tcase(suite, tcp);
    sr = srunner_create(suite);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
