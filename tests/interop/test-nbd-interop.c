/* The NBD server against QEMU's own NBD clients: qemu-io, qemu-img and
 * qemu-nbd talk to an in-process server while the test keeps its loop
 * running. */
#include "nbd-harness.h"

#define SIZE (4 * 1024 * 1024)

static char *url;
static char *disk;

static void setup(void)
{
    if (!have_tool("qemu-io") || !have_tool("qemu-img")) {
        return;
    }
    harness_setup();
    url = g_strdup_printf("nbd+unix:///e0?socket=%s", sock_path);
}

static void teardown(void)
{
    /* A test may have freed the context itself: clean up the rest. */
    if (dir) {
        harness_teardown();
        dir = NULL;
        sock_path = NULL;
    }
    g_clear_pointer(&url, g_free);
    g_clear_pointer(&disk, g_free);
}

#define SKIP_WITHOUT_TOOLS() do { \
        if (!ctx) { \
            fprintf(stderr, "qemu-io/qemu-img missing: skipped\n"); \
            return; \
        } \
    } while (0)

/* A raw disk: 64 KiB of 0x11 at the start, a hole after it. */
static void add_raw(bool writable)
{
    disk = make_raw("disk.raw", SIZE, 65536, 0x11);
    add_node("driver=raw,node-name=disk,file.driver=file,file.filename=%s",
             disk);
    add_export("type=nbd,id=e0,node-name=disk,name=e0,writable=%s,"
               "description=the disk", writable ? "on" : "off");
}

static void assert_tool_ok(int status, const char *out)
{
    ck_assert_msg(status == 0, "exit %d: %s", status, out);
    ck_assert_msg(!strstr(out, "failed") && !strstr(out, "error"), "%s",
                  out);
}

START_TEST(test_qemu_io_rw)
{
    g_autofree char *out = NULL;
    int st;

    SKIP_WITHOUT_TOOLS();
    add_raw(true);
    st = run_tool(&out, "qemu-io", "-f", "raw", url,
                  "-c", "read -P 0x11 0 64k",
                  "-c", "write -P 0xab 1M 64k",
                  "-c", "read -P 0xab 1M 64k",
                  "-c", "write -z 1M 4k",
                  "-c", "read -P 0 1M 4k",
                  "-c", "read -P 0xab 1028k 60k",
                  "-c", "write -f -P 0xcd 2M 512",
                  "-c", "read -P 0xcd 2M 512",
                  "-c", "discard 3M 64k",
                  "-c", "read -P 0 3M 64k",
                  "-c", "flush", NULL);
    assert_tool_ok(st, out);
    ck_assert(strstr(out, "wrote 65536/65536"));

    /* The file holds what the client wrote. */
    g_clear_pointer(&out, g_free);
    st = run_tool(&out, "qemu-img", "compare", "-U", "-f", "raw", "-F",
                  "raw", disk, url, NULL);
    ck_assert_msg(st == 0, "compare: %s", out);
    g_clear_pointer(&out, g_free);
    st = run_tool(&out, "qemu-io", "-r", "-U", "-f", "raw", disk,
                  "-c", "read -P 0xab 1028k 60k", "-c", "read -P 0xcd 2M 512",
                  NULL);
    assert_tool_ok(st, out);
}
END_TEST

START_TEST(test_qemu_img_info_map)
{
    g_autofree char *out = NULL;
    g_autofree char *file_map = NULL;
    int st;

    SKIP_WITHOUT_TOOLS();
    add_raw(false);
    st = run_tool(&out, "qemu-img", "info", "--output=json", url, NULL);
    ck_assert_msg(st == 0, "%s", out);
    ck_assert_msg(strstr(out, "\"virtual-size\": 4194304"), "%s", out);

    g_clear_pointer(&out, g_free);
    st = run_tool(&out, "qemu-img", "map", "--output=json", "-f", "raw", url,
                  NULL);
    ck_assert_msg(st == 0, "%s", out);
    st = run_tool(&file_map, "qemu-img", "map", "--output=json", "-U", "-f",
                  "raw", disk, NULL);
    ck_assert_msg(st == 0, "%s", file_map);

    /* Same extents, same data/zero answers (offsets differ: the file's
     * are host offsets). */
    g_autoptr(JsonParser) p1 = json_parser_new();
    g_autoptr(JsonParser) p2 = json_parser_new();
    ck_assert_msg(json_parser_load_from_data(p1, out, -1, NULL), "%s", out);
    ck_assert(json_parser_load_from_data(p2, file_map, -1, NULL));
    JsonArray *a1 = json_node_get_array(json_parser_get_root(p1));
    JsonArray *a2 = json_node_get_array(json_parser_get_root(p2));
    ck_assert_msg(json_array_get_length(a1) == json_array_get_length(a2),
                  "nbd: %s\nfile: %s", out, file_map);
    for (guint i = 0; i < json_array_get_length(a1); i++) {
        JsonObject *o1 = json_array_get_object_element(a1, i);
        JsonObject *o2 = json_array_get_object_element(a2, i);
        const char *keys[] = { "start", "length" };
        for (int k = 0; k < 2; k++) {
            ck_assert_int_eq(json_object_get_int_member(o1, keys[k]),
                             json_object_get_int_member(o2, keys[k]));
        }
        ck_assert_msg(json_object_get_boolean_member(o1, "data") ==
                      json_object_get_boolean_member(o2, "data"),
                      "nbd: %s\nfile: %s", out, file_map);
        ck_assert_msg(json_object_get_boolean_member(o1, "zero") ==
                      json_object_get_boolean_member(o2, "zero"),
                      "nbd: %s\nfile: %s", out, file_map);
    }
    ck_assert_int_ge(json_array_get_length(a1), 2);
}
END_TEST

START_TEST(test_qemu_nbd_list)
{
    g_autofree char *out = NULL;
    int st;

    SKIP_WITHOUT_TOOLS();
    if (!have_tool("qemu-nbd")) {
        return;
    }
    add_raw(false);
    add_node("driver=null-co,node-name=n1,read-zeroes=on");
    add_export("type=nbd,id=e1,node-name=n1");
    st = run_tool(&out, "qemu-nbd", "--list", "-k", sock_path, NULL);
    ck_assert_msg(st == 0, "%s", out);
    ck_assert_msg(strstr(out, "export: 'e0'"), "%s", out);
    ck_assert_msg(strstr(out, "description: the disk"), "%s", out);
    ck_assert_msg(strstr(out, "export: 'n1'"), "%s", out);
    ck_assert_msg(strstr(out, "base:allocation"), "%s", out);
    ck_assert_msg(strstr(out, "qemu:allocation-depth"), "%s", out);
    ck_assert_msg(strstr(out, "size:  4194304"), "%s", out);
}
END_TEST

START_TEST(test_concurrent_clients)
{
    enum { N = 8 };
    ToolRun runs[N];
    g_autofree char *out = NULL;

    SKIP_WITHOUT_TOOLS();
    add_raw(true);
    for (int i = 0; i < N; i++) {
        g_autofree char *w = g_strdup_printf("write -P %d %dk 256k", 0x20 + i,
                                             256 * i);
        g_autofree char *r = g_strdup_printf("read -P %d %dk 256k", 0x20 + i,
                                             256 * i);
        g_autofree char *rr = g_strdup_printf("aio_read -P %d %dk 64k",
                                              0x20 + i, 256 * i + 64);
        const char *argv[] = { "qemu-io", "-f", "raw", url, "-c", w, "-c", r,
                               "-c", rr, "-c", "aio_flush", NULL };
        tool_start(&runs[i], argv);
    }
    for (int i = 0; i < N; i++) {
        int st = tool_wait(&runs[i]);
        assert_tool_ok(st, runs[i].out);
        tool_finish(&runs[i]);
    }
    /* Every client's data landed where it wrote it. */
    for (int i = 0; i < N; i++) {
        g_autofree char *r = g_strdup_printf("read -P %d %dk 256k", 0x20 + i,
                                             256 * i);
        g_clear_pointer(&out, g_free);
        int st = run_tool(&out, "qemu-io", "-r", "-U", "-f", "raw", disk, "-c", r,
                          NULL);
        assert_tool_ok(st, out);
    }
    ck_assert_uint_eq(strata_export_client_count(
                          strata_export_find(ctx, "e0")), 0);
}
END_TEST

START_TEST(test_qcow2_export)
{
    g_autofree char *out = NULL;
    g_autofree char *path = NULL;
    int st;

    SKIP_WITHOUT_TOOLS();
    path = g_build_filename(dir, "disk.qcow2", NULL);
    st = run_tool(&out, "qemu-img", "create", "-q", "-f", "qcow2", path,
                  "4M", NULL);
    ck_assert_msg(st == 0, "%s", out);
    add_node("driver=qcow2,node-name=q,file.driver=file,file.filename=%s",
             path);
    add_export("type=nbd,id=e0,node-name=q,writable=on,name=e0");

    g_clear_pointer(&out, g_free);
    st = run_tool(&out, "qemu-io", "-f", "raw", url,
                  "-c", "write -P 0x5c 128k 192k",
                  "-c", "read -P 0x5c 128k 192k",
                  "-c", "read -P 0 0 128k",
                  "-c", "read -P 0 320k 64k",
                  "-c", "read -P 0 512k 3M", NULL);
    assert_tool_ok(st, out);
    /* The unallocated ranges came as hole chunks, which QEMU's client
     * turns into zeroes; a read across data and hole, as data. */
    g_clear_pointer(&out, g_free);
    st = run_tool(&out, "qemu-io", "-f", "raw", url,
                  "-c", "read -P 0 64k 64k", "-c", "read -P 0x5c 256k 64k",
                  "-c", "read -P 0 320k 4k", NULL);
    assert_tool_ok(st, out);

    /* Block status through the format: only what was written is data. */
    g_clear_pointer(&out, g_free);
    st = run_tool(&out, "qemu-img", "map", "--output=json", "-f", "raw", url,
                  NULL);
    ck_assert_msg(st == 0, "%s", out);
    ck_assert_msg(strstr(out, "\"start\": 131072, \"length\": 196608, "
                              "\"depth\": 0, \"present\": true, "
                              "\"zero\": false, \"data\": true"),
                  "%s", out);
    /* What no layer holds reads as zeroes (hole and zero, as QEMU's
     * server says), not as unknown content. */
    ck_assert_msg(strstr(out, "\"start\": 0, \"length\": 131072, "
                              "\"depth\": 0, \"present\": true, "
                              "\"zero\": true, \"data\": false"),
                  "%s", out);

    /* Close everything, then QEMU checks the image. */
    strata_context_free(ctx);
    ctx = NULL;
    g_clear_pointer(&out, g_free);
    st = run_tool(&out, "qemu-img", "check", path, NULL);
    ck_assert_msg(st == 0, "%s", out);
    g_clear_pointer(&out, g_free);
    st = run_tool(&out, "qemu-io", "-f", "qcow2", path,
                  "-c", "read -P 0x5c 128k 192k", NULL);
    assert_tool_ok(st, out);
}
END_TEST

START_TEST(test_blkdebug_eio)
{
    g_autofree char *out = NULL;
    int st;

    SKIP_WITHOUT_TOOLS();
    disk = make_raw("disk.raw", SIZE, 0, 0);
    add_node("driver=blkdebug,node-name=dbg,image.driver=file,"
             "image.filename=%s,inject-error.0.event=read_aio,"
             "inject-error.0.errno=5,inject-error.0.sector=8", disk);
    add_export("type=nbd,id=e0,node-name=dbg,name=e0");
    st = run_tool(&out, "qemu-io", "-r", "-f", "raw", url,
                  "-c", "read 0 4k", "-c", "read 4k 4k", NULL);
    ck_assert_msg(strstr(out, "Input/output error"), "%s", out);
    ck_assert_msg(strstr(out, "read 4096/4096 bytes at offset 0"), "%s",
                  out);
    ck_assert_int_ne(st, 0);
}
END_TEST

START_TEST(test_readonly)
{
    g_autofree char *out = NULL;
    int st;

    SKIP_WITHOUT_TOOLS();
    add_raw(false);
    st = run_tool(&out, "qemu-io", "-f", "raw", url,
                  "-c", "write -P 0xee 0 4k", NULL);
    ck_assert_int_ne(st, 0);
    g_clear_pointer(&out, g_free);
    st = run_tool(&out, "qemu-io", "-r", "-f", "raw", url,
                  "-c", "read -P 0x11 0 64k", NULL);
    assert_tool_ok(st, out);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("nbd-interop");

    strata_test_add(s, "/nbd-interop/qemu-io/rw", test_qemu_io_rw, setup,
                    teardown);
    strata_test_add(s, "/nbd-interop/qemu-img/info-map",
                    test_qemu_img_info_map, setup, teardown);
    strata_test_add(s, "/nbd-interop/qemu-nbd/list", test_qemu_nbd_list,
                    setup, teardown);
    strata_test_add(s, "/nbd-interop/qemu-io/concurrent",
                    test_concurrent_clients, setup, teardown);
    strata_test_add(s, "/nbd-interop/qcow2", test_qcow2_export, setup,
                    teardown);
    strata_test_add(s, "/nbd-interop/blkdebug-eio", test_blkdebug_eio,
                    setup, teardown);
    strata_test_add(s, "/nbd-interop/readonly", test_readonly, setup,
                    teardown);
    return strata_test_run(s);
}
