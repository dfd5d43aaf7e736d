/* qtest: the seeds' walkthrough, live against stratad.
 *
 * A guest (qemu-io over NBD) writes to RootBase; live external snapshots
 * build RootBase <- Snap-1 <- Snap-2 <- Snap-3 <- Active, each layer
 * writing its own region and the shared first 64 KiB (one snapshot is
 * taken while a second guest process writes).  Then, on fresh copies of
 * that chain, each blockcommit case (1)-(6) and each blockpull figure
 * (5: pull into Active above RootBase; 6: Active standalone) runs live
 * with the chain exported; the guest writes afterwards.  With the daemon
 * gone, qemu-img checks every result: clean images, the backing chain
 * the case leaves, the same guest-visible content as the original chain
 * plus the later write, and the committed data in the base. */
#include "snapshot-helpers.h"
#include "../unit/test-util.h"

#define REGION (512 * 1024)

static const char *layers[] = { "RootBase", "Snap-1", "Snap-2", "Snap-3",
                                "Active" };

typedef struct {
    const char *name;
    const char *job;    /* "commit" or "stream" */
    int top, base;      /* layer indices; base -1: none */
    const char *chain;  /* the chain left, top first */
} Case;

static const Case cases[] = {
    { "c1", "commit", 3, 0, "Active RootBase" },
    { "c2", "commit", 2, 0, "Active Snap-3 RootBase" },
    { "c3", "commit", 1, 0, "Active Snap-3 Snap-2 RootBase" },
    { "c4", "commit", 2, 1, "Active Snap-3 Snap-1 RootBase" },
    { "c5", "commit", 3, 2, "Active Snap-2 Snap-1 RootBase" },
    { "c6", "commit", 3, 1, "Active Snap-1 RootBase" },
    { "f5", "stream", 4, 0, "Active RootBase" },
    { "f6", "stream", 4, -1, "Active" },
};

/* What layer @l writes: its region and the shared first 64 KiB. */
static bool layer_writes(QTestState *s, const char *exp, int l)
{
    g_autofree char *c = g_strdup_printf(
        "-c 'write -P %d %d 512k' -c 'write -P %d 0 64k'", 0x10 + l,
        l * REGION, 0x10 + l);
    return nbd_io(s, exp, c);
}

static void snapshot(QTestState *s, int l)
{
    g_autofree char *req = g_strdup_printf(
        "{\"execute\": \"blockdev-snapshot-sync\", \"arguments\": "
        "{\"node-name\": \"%s\", \"snapshot-file\": \"%s.qcow2\", "
        "\"snapshot-node-name\": \"%s\"}}", layers[l - 1], layers[l],
        layers[l]);
    ok(s, req);
}

/* Builds the chain live in the scratch dir, then quits the daemon. */
static void build_chain(QTestState *s)
{
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 RootBase.qcow2 4M "
                           "&& qemu-io -c 'write -P 16 0 512k' "
                           "RootBase.qcow2 >/dev/null"), 0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"RootBase\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"RootBase.qcow2\"}}}");
    ok(s, "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
          "{\"type\": \"unix\", \"data\": {\"path\": \"nbd.sock\"}}}}");
    ok(s, "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
          "\"nbd\", \"id\": \"vda\", \"name\": \"vda\", \"node-name\": "
          "\"RootBase\", \"writable\": true}}");
    ck_assert(layer_writes(s, "vda", 0));
    for (int l = 1; l < 5; l++) {
        if (l == 4) {
            /* A second guest process writes while the snapshot is
             * taken: its data is in one layer or the other, whole. */
            ck_assert_int_eq(sh(s, "(qemu-io -f raw -c 'write -P 102 3M "
                                   "256k' -c 'write -P 103 3584k 256k' "
                                   "'nbd+unix:///vda?socket=nbd.sock' "
                                   ">bg.log 2>&1; touch bg.done) &"), 0);
        }
        snapshot(s, l);
        ck_assert(layer_writes(s, "vda", l));
    }
    for (int i = 0; i < 2000; i++) {
        g_autofree char *p = g_build_filename(qtest_dir(s), "bg.done", NULL);
        if (g_file_test(p, G_FILE_TEST_EXISTS)) {
            break;
        }
        g_usleep(10000);
    }
    ck_assert_int_eq(sh(s, "test -e bg.done && ! grep -q -e fail -e error "
                           "bg.log"), 0);
    /* The live view of the guest: every layer's region, Active's shared
     * part, the concurrent writes. */
    ck_assert(nbd_io(s, "vda", "-c 'read -P 20 0 64k' -c 'read -P 16 64k "
                              "448k' -c 'read -P 17 512k 512k' -c 'read -P "
                              "18 1M 512k' -c 'read -P 19 1536k 512k' -c "
                              "'read -P 20 2M 512k' -c 'read -P 102 3M 256k'"
                              " -c 'read -P 103 3584k 256k'"));
    {
        g_autoptr(JsonNode) r = qtest_qmp(s, "{\"execute\": \"quit\"}");
        ck_assert(r && qtest_is_return(r));
        ck_assert_int_eq(qtest_wait_exit(s, 20000), 0);
    }
    /* What each case must show the guest at the end: the chain's view
     * plus the write made after the job. */
    ck_assert_int_eq(sh(s, "qemu-img convert -O qcow2 Active.qcow2 "
                           "expect.qcow2 && qemu-io -c 'write -P 85 2560k "
                           "256k' expect.qcow2 >/dev/null"), 0);
    {
        g_autofree char *chain = sh_out(
            s, "qemu-img info --backing-chain Active.qcow2 | grep '^image:'"
               " | tr '\\n' ' '");
        ck_assert_str_eq(chain, "image: Active.qcow2 image: Snap-3.qcow2 "
                                "image: Snap-2.qcow2 image: Snap-1.qcow2 "
                                "image: RootBase.qcow2 ");
    }
}

/* Opens case @c's copy of the chain as named nodes and exports it. */
static void open_case(QTestState *s, const Case *c)
{
    ck_assert_int_eq(sh(s, "mkdir %s && cp RootBase.qcow2 Snap-1.qcow2 "
                           "Snap-2.qcow2 Snap-3.qcow2 Active.qcow2 %s/",
                        c->name, c->name), 0);
    for (int l = 0; l < 5; l++) {
        g_autofree char *backing = l ? g_strdup_printf(
            "\"%s-%s\"", c->name, layers[l - 1]) : g_strdup("null");
        g_autofree char *req = g_strdup_printf(
            "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
            "\"qcow2\", \"node-name\": \"%s-%s\", \"backing\": %s, "
            "\"file\": {\"driver\": \"file\", \"filename\": "
            "\"%s/%s.qcow2\"}}}", c->name, layers[l], backing, c->name,
            layers[l]);
        ok(s, req);
    }
    {
        g_autofree char *req = g_strdup_printf(
            "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
            "\"nbd\", \"id\": \"%s\", \"name\": \"%s\", \"node-name\": "
            "\"%s-Active\", \"writable\": true}}", c->name, c->name,
            c->name);
        ok(s, req);
    }
}

static void run_case(QTestState *s, const Case *c)
{
    g_autofree char *req = NULL;
    g_autoptr(JsonNode) ev = NULL;

    open_case(s, c);
    if (!strcmp(c->job, "commit")) {
        req = g_strdup_printf(
            "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
            "\"%s\", \"device\": \"%s-Active\", \"top-node\": \"%s-%s\", "
            "\"base-node\": \"%s-%s\"}}", c->name, c->name, c->name,
            layers[c->top], c->name, layers[c->base]);
    } else if (c->base >= 0) {
        req = g_strdup_printf(
            "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
            "\"%s\", \"device\": \"%s-Active\", \"base-node\": \"%s-%s\"}}",
            c->name, c->name, c->name, layers[c->base]);
    } else {
        req = g_strdup_printf(
            "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
            "\"%s\", \"device\": \"%s-Active\"}}", c->name, c->name);
    }
    ok(s, req);
    ev = want_event(s, "BLOCK_JOB_COMPLETED");
    ck_assert_str_eq(json_object_get_string_member(data_of(ev), "device"),
                     c->name);
    ck_assert_msg(!json_object_has_member(data_of(ev), "error"), "%s: %s",
                  c->name, json_object_get_string_member(data_of(ev),
                                                         "error"));
    /* The guest goes on: still the same data, and it can write. */
    ck_assert(nbd_io(s, c->name, "-c 'read -P 20 0 64k' -c 'read -P 17 512k "
                                "512k' -c 'write -P 85 2560k 256k' -c 'read "
                                "-P 85 2560k 256k'"));
}

/* With the daemon gone: case @c's images as qemu-img sees them. */
static void check_case(QTestState *s, const Case *c)
{
    g_autofree char *chain = sh_out(
        s, "cd %s && qemu-img info --backing-chain Active.qcow2 | "
           "grep '^image:' | sed 's/^image: //; s/.qcow2$//' | "
           "tr '\\n' ' '", c->name);
    g_autofree char *want = g_strdup_printf("%s ", c->chain);

    ck_assert_msg(!strcmp(chain, want), "%s: chain '%s', want '%s'",
                  c->name, chain, want);
    for (int l = 0; l < 5; l++) {
        if (strstr(want, layers[l])) {
            ck_assert_msg(sh(s, "qemu-img check -q %s/%s.qcow2", c->name,
                             layers[l]) == 0, "%s: %s not clean", c->name,
                          layers[l]);
        }
    }
    ck_assert_msg(sh(s, "qemu-img compare -q %s/Active.qcow2 expect.qcow2",
                     c->name) == 0, "%s: the guest's view changed",
                  c->name);
    if (!strcmp(c->job, "commit")) {
        /* The base now holds the top's shared part and the regions of
         * the layers committed into it. */
        g_autofree char *base = g_strdup_printf(
            "%s/%s.qcow2", c->name, layers[c->base]);
        g_autofree char *out = sh_out(
            s, "qemu-io -r -c 'read -P %d 0 64k' -c 'read -P %d %d 512k' %s "
               "2>&1", 0x10 + c->top, 0x10 + c->top, c->top * REGION, base);
        ck_assert_msg(!strstr(out, "fail"), "%s: base lacks the top's data:"
                      " %s", c->name, out);
    }
}

START_TEST(test_walkthrough)
{
    QTestState *s, *s2;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    build_chain(s);
    /* A second daemon works on copies of the chain. */
    s2 = qtest_start(NULL, true);
    ck_assert_int_eq(sh(s2, "cp '%s'/*.qcow2 .", qtest_dir(s)), 0);
    qtest_end(s);
    ok(s2, "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": "
           "{\"type\": \"unix\", \"data\": {\"path\": \"nbd.sock\"}}}}");
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        run_case(s2, &cases[i]);
    }
    {
        g_autoptr(JsonNode) r = qtest_qmp(s2, "{\"execute\": \"quit\"}");
        ck_assert(r && qtest_is_return(r));
        ck_assert_int_eq(qtest_wait_exit(s2, 20000), 0);
    }
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        check_case(s2, &cases[i]);
    }
    qtest_end(s2);
}
END_TEST

int main(void)
{
    if (!have_qemu_tools()) {
        return 77;
    }
    const StrataTestCase tests[] = {
        { "/walkthrough/walkthrough", test_walkthrough },
    };

    return strata_test_main("walkthrough", tests, NULL, NULL);
}
