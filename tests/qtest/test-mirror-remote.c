/* qtest: the mirror engine with an NBD target exported by a second
 * stratad — live storage migration (blockdev-add driver nbd on the
 * source daemon, blockdev-mirror sync=full, READY, complete, the remote
 * image checked with qemu-img compare), and a forced cancel that
 * returns at once while the target daemon hangs. */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>

#include "libqtest.h"
#include "job-helpers.h"

/* The destination daemon: an empty @size qcow2 (or raw) exported as
 * "disk" on DIR/nbd.sock. */
static QTestState *destination(const char *fmt, const char *size)
{
    QTestState *d = qtest_start(NULL, true);
    g_autofree char *add = g_strdup_printf(
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"%s\", \"node-name\": \"disk\", \"file\": {\"driver\": "
        "\"file\", \"filename\": \"dst.img\"}}}", fmt);

    ck_assert_int_eq(sh(d, "qemu-img create -q -f %s dst.img %s", fmt,
                        size), 0);
    ok(d, add);
    ok(d, "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
          "{\"type\": \"unix\", \"data\": {\"path\": \"nbd.sock\"}}}}");
    ok(d, "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
          "\"nbd\", \"id\": \"e\", \"node-name\": \"disk\", \"name\": "
          "\"disk\", \"writable\": true}}");
    return d;
}

/* On the source daemon: node "remote", the destination's export. */
static void add_remote(QTestState *s, QTestState *d)
{
    g_autofree char *add = g_strdup_printf(
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"nbd\", \"node-name\": \"remote\", \"server\": {\"type\": "
        "\"unix\", \"path\": \"%s/nbd.sock\"}, \"export\": \"disk\"}}",
        qtest_dir(d));

    ok(s, add);
}

START_TEST(test_storage_migration)
{
    QTestState *d, *s;
    g_autofree char *cmp = NULL;

    if (!have_qemu_tools()) {
        return;
    }
    d = destination("qcow2", "16M");
    s = qtest_start(NULL, true);
    /* the VM's disk: a two-layer chain, exported for the guest */
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 s0.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 6M' s0.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "s0.qcow2 s1.qcow2 && "
                           "qemu-io -c 'write -P 0x22 4M 4M' s1.qcow2 && "
                           "qemu-img convert -O raw s1.qcow2 ref.raw "
                           ">/dev/null"), 0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"s1\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"s1.qcow2\"}}}");
    ok(s, "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
          "{\"type\": \"unix\", \"data\": {\"path\": \"nbd.sock\"}}}}");
    ok(s, "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
          "\"nbd\", \"id\": \"vm\", \"node-name\": \"s1\", \"name\": "
          "\"disk\", \"writable\": true}}");
    add_remote(s, d);

    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"mig\", \"device\": \"s1\", \"target\": \"remote\", \"sync\": "
          "\"full\", \"speed\": 4194304}}");
    reach_status(s, "mig", "running");
    ck_assert_int_eq(guest_io(s, "write -P 0x33 1M 1M"), 0);
    ck_assert_int_eq(guest_io(s, "write -P 0x34 13M 64k"), 0);
    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"mig\", \"speed\": 0}}");
    reach_status(s, "mig", "ready");
    ck_assert_int_eq(guest_io(s, "write -P 0x35 9M 512k"), 0);
    ok(s, "{\"execute\": \"block-job-complete\", \"arguments\": "
          "{\"device\": \"mig\"}}");
    reach_status(s, "mig", "null");
    {
        JsonNode *r = qtest_qmp(s, "{\"execute\": "
                                   "\"query-block-exports\"}");
        JsonArray *a = json_node_get_array(json_object_get_member(
            json_node_get_object(r), "return"));
        ck_assert_str_eq(json_object_get_string_member(
                             json_array_get_object_element(a, 0),
                             "node-name"), "remote");
        json_node_unref(r);
    }
    /* after the pivot the guest writes to the remote disk */
    ck_assert_int_eq(guest_io(s, "write -P 0x36 15M 1M"), 0);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ok(d, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(d, 10000), 0);
    cmp = g_strdup_printf("qemu-img compare -q -f raw -F qcow2 ref.raw "
                          "'%s/dst.img'", qtest_dir(d));
    ck_assert_int_eq(sh(s, "%s", cmp), 0);
    ck_assert_int_eq(sh(d, "qemu-img check -q dst.img"), 0);
    /* the source stays as it was at the pivot */
    ck_assert_int_eq(sh(s, "! qemu-img compare -q -F raw s1.qcow2 ref.raw "
                           "2>/dev/null"), 0);
    qtest_end(s);
    qtest_end(d);
}
END_TEST

/* The destination daemon stops answering (SIGSTOP) with copies in
 * flight: a forced cancel still ends the job at once — the liveness
 * wait is generous, a cancel that waited for the copies would never
 * end. */
START_TEST(test_force_cancel_hung_target)
{
    QTestState *d, *s;

    if (!have_qemu_tools()) {
        return;
    }
    d = destination("raw", "32M");
    s = qtest_start(NULL, true);
    ck_assert_int_eq(sh(s, "qemu-img create -q -f raw src.raw 32M && "
                           "qemu-io -f raw -c 'write -P 0x5a 0 32M' "
                           "src.raw >/dev/null"), 0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"raw\", \"node-name\": \"src\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"src.raw\"}}}");
    add_remote(s, d);
    ck_assert_int_eq(kill(qtest_pid(d), SIGSTOP), 0);
    ok(s, "{\"execute\": \"blockdev-mirror\", \"arguments\": {\"job-id\": "
          "\"m\", \"device\": \"src\", \"target\": \"remote\", \"sync\": "
          "\"full\"}}");
    reach_status(s, "m", "running");
    /* let the first copies reach the stopped target */
    ck_assert_int_eq(sh(s, "sleep 0.3"), 0);
    ok(s, "{\"execute\": \"block-job-cancel\", \"arguments\": "
          "{\"device\": \"m\", \"force\": true}}");
    {
        g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_CANCELLED");
        ck_assert_str_eq(json_object_get_string_member(data_of(c), "type"),
                         "mirror");
        ck_assert_int_lt(json_object_get_int_member(data_of(c), "offset"),
                         32 * 1024 * 1024);
    }
    reach_status(s, "m", "null");
    {
        JsonNode *r = qtest_qmp(s, "{\"execute\": \"query-block-jobs\"}");
        ck_assert_int_eq(json_array_get_length(json_node_get_array(
            json_object_get_member(json_node_get_object(r), "return"))), 0);
        json_node_unref(r);
    }
    /* the daemon still serves commands */
    ok(s, "{\"execute\": \"query-named-block-nodes\"}");
    ck_assert_int_eq(kill(qtest_pid(d), SIGCONT), 0);
    qtest_end(s);
    qtest_end(d);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("mirror-remote");
    TCase *tc = tcase_create("mirror-remote");
    SRunner *sr;
    int failed;

    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_storage_migration);
    tcase_add_test(tc, test_force_cancel_hung_target);
    suite_add_tcase(suite, tc);
    sr = srunner_create(suite);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
