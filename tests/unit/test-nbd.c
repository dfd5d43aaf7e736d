/* Tests of the NBD server with a raw protocol client: the control API
 * (start, stop, add, del, query, events), negotiation, every command,
 * and hostile input. */
#include "../interop/nbd-harness.h"
#include "qcow2/qcow2.h"

#define SIZE (1024 * 1024)

static void setup(void)
{
    harness_setup();
}

static void teardown(void)
{
    harness_teardown();
}

/* A writable raw export "disk" over a file whose first 64 KiB hold
 * 0x11; the rest is a hole. */
static void add_disk(bool writable)
{
    g_autofree char *path = make_raw("disk.raw", SIZE, 65536, 0x11);
    add_node("driver=raw,node-name=disk,file.driver=file,file.filename=%s",
             path);
    add_export("type=nbd,id=e0,node-name=disk,name=e0,writable=%s,"
               "description=first disk", writable ? "on" : "off");
}

/* ---- control API ---- */

START_TEST(test_server_start_stop)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GSocketAddress) sa = g_unix_socket_address_new("/nonexistent");
    g_autoptr(JsonObject) opts = json_object_new();

    ck_assert(strata_nbd_server_running(ctx));
    ck_assert(!strata_nbd_server_start(ctx, sa, 0, &err));
    ck_assert_str_eq(err->message, "NBD server already running");
    g_clear_error(&err);
    ck_assert(strata_nbd_server_stop(ctx, &err));
    ck_assert(!g_file_test(sock_path, G_FILE_TEST_EXISTS));
    ck_assert(!strata_nbd_server_stop(ctx, &err));
    ck_assert_str_eq(err->message, "NBD server not running");
    g_clear_error(&err);

    add_node("driver=null-co,node-name=n0,read-zeroes=on");
    json_object_set_string_member(opts, "type", "nbd");
    json_object_set_string_member(opts, "id", "e0");
    json_object_set_string_member(opts, "node-name", "n0");
    ck_assert(!strata_export_add(ctx, opts, &err));
    ck_assert_str_eq(err->message, "NBD server not running");
    g_clear_error(&err);

    /* The legacy address form of nbd-server-start. */
    g_autoptr(JsonParser) parser = json_parser_new();
    g_autofree char *txt = g_strdup_printf(
        "{\"type\": \"unix\", \"data\": {\"path\": \"%s\"}}", sock_path);
    ck_assert(json_parser_load_from_data(parser, txt, -1, NULL));
    JsonObject *addr = json_node_get_object(json_parser_get_root(parser));
    ck_assert_msg(strata_nbd_server_start_legacy(ctx, addr, 0, &err), "%s",
                  err ? err->message : "");
    ck_assert(g_file_test(sock_path, G_FILE_TEST_EXISTS));
    ck_assert(strata_export_add(ctx, opts, &err));
    ck_assert(strata_nbd_server_stop(ctx, NULL));
    /* Stopping deletes the exports, with their events. */
    ck_assert_int_eq(events_deleted, 1);
    ck_assert_str_eq(last_event_id, "e0");
    ck_assert(!strata_export_find(ctx, "e0"));
}
END_TEST

START_TEST(test_legacy_addr_errors)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) addr = json_object_new();
    JsonObject *data = json_object_new();

    ck_assert(strata_nbd_server_stop(ctx, NULL));
    json_object_set_string_member(addr, "type", "vsock");
    json_object_set_object_member(addr, "data", data);
    ck_assert(!strata_nbd_server_start_legacy(ctx, addr, 0, &err));
    ck_assert(strstr(err->message, "not supported"));
    g_clear_error(&err);
    json_object_set_string_member(addr, "type", "unix");
    ck_assert(!strata_nbd_server_start_legacy(ctx, addr, 0, &err));
    ck_assert_str_eq(err->message, "Parameter 'addr.data.path' is missing");
    g_clear_error(&err);
    ck_assert(!strata_nbd_server_start_legacy(ctx, addr, -1, &err));
    g_clear_error(&err);
    ck_assert(!strata_nbd_server_running(ctx));
}
END_TEST

START_TEST(test_export_add_errors)
{
    g_autoptr(GError) err = NULL;

    add_node("driver=null-co,node-name=n0,read-zeroes=on");
    add_node("driver=null-co,node-name=n1,read-zeroes=on");
    add_export("type=nbd,id=e0,node-name=n0");
    ck_assert(!strata_export_add_keyval(ctx, "type=nbd,id=e0,node-name=n1",
                                        &err));
    ck_assert_str_eq(err->message, "Block export id 'e0' is already in use");
    g_clear_error(&err);
    ck_assert(!strata_export_add_keyval(
        ctx, "type=nbd,id=e1,node-name=n1,name=n0", &err));
    ck_assert_str_eq(err->message,
                     "NBD server already has export named 'n0'");
    g_clear_error(&err);
    ck_assert(!strata_export_add_keyval(ctx, "type=nbd,id=e1,node-name=zz",
                                        &err));
    ck_assert_str_eq(err->message,
                     "Cannot find device='' nor node-name='zz'");
    g_clear_error(&err);
    ck_assert(!strata_export_add_keyval(ctx, "type=nbd,id=1x,node-name=n1",
                                        &err));
    ck_assert_str_eq(err->message, "Invalid block export id '1x'");
    g_clear_error(&err);
    ck_assert(!strata_export_add_keyval(ctx, "type=fuse,id=e1,node-name=n1",
                                        &err));
    g_clear_error(&err);
    ck_assert(!strata_export_add_keyval(ctx, "type=nbd,id=e1", &err));
    ck_assert_str_eq(err->message, "Parameter 'node-name' is missing");
    g_clear_error(&err);
    ck_assert(!strata_export_add_keyval(
        ctx, "type=nbd,id=e1,node-name=n1,bogus=1", &err));
    g_clear_error(&err);
    ck_assert(!strata_export_del(ctx, "nope", false, &err));
    ck_assert_str_eq(err->message, "Export 'nope' is not found");
    g_clear_error(&err);
    /* The node is in use while exported. */
    ck_assert(!strata_context_del_node(ctx, "n0", &err));
    g_clear_error(&err);
    ck_assert(strata_export_del(ctx, "e0", false, &err));
    ck_assert_int_eq(events_deleted, 1);
    ck_assert(strata_context_del_node(ctx, "n0", &err));
}
END_TEST

START_TEST(test_export_query)
{
    add_node("driver=null-co,node-name=n0,read-zeroes=on");
    add_node("driver=null-co,node-name=n1,read-zeroes=on");
    add_export("type=nbd,id=e0,node-name=n0");
    add_export("type=nbd,id=e1,node-name=n1,name=e0");

    g_autoptr(JsonArray) arr = strata_export_query(ctx);
    ck_assert_int_eq(json_array_get_length(arr), 2);
    JsonObject *o = json_array_get_object_element(arr, 0);
    ck_assert_str_eq(json_object_get_string_member(o, "id"), "e1");
    ck_assert_str_eq(json_object_get_string_member(o, "node-name"), "n1");
    ck_assert_str_eq(json_object_get_string_member(o, "type"), "nbd");
    ck_assert(!json_object_get_boolean_member(o, "shutting-down"));
    o = json_array_get_object_element(arr, 1);
    ck_assert_str_eq(json_object_get_string_member(o, "id"), "e0");
}
END_TEST

/* ---- negotiation ---- */

typedef struct {
    const char *name;
    uint64_t size;
    uint16_t tflags;
} GoArgs;

static char *sc_go(void *opaque)
{
    GoArgs *a = opaque;
    int fd = raw_open(a->name, false, false, &a->size, &a->tflags);
    SCHECK(fd >= 0);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_DISC, 1, 0, 0, NULL));
    SCHECK(raw_is_closed(fd));
    close(fd);
    return NULL;
}

START_TEST(test_go)
{
    GoArgs a = { "e0", 0, 0 };
    char *res;

    add_disk(true);
    res = run_scenario(sc_go, &a);
    ck_assert_msg(!res, "%s", res);
    ck_assert_uint_eq(a.size, SIZE);
    ck_assert(a.tflags & STRATA_NBD_FLAG_HAS_FLAGS);
    ck_assert(a.tflags & STRATA_NBD_FLAG_SEND_FLUSH);
    ck_assert(a.tflags & STRATA_NBD_FLAG_SEND_WRITE_ZEROES);
    ck_assert(!(a.tflags & STRATA_NBD_FLAG_READ_ONLY));
}
END_TEST

START_TEST(test_go_readonly_flags)
{
    GoArgs a = { "e0", 0, 0 };
    char *res;

    add_disk(false);
    res = run_scenario(sc_go, &a);
    ck_assert_msg(!res, "%s", res);
    ck_assert(a.tflags & STRATA_NBD_FLAG_READ_ONLY);
    ck_assert(!(a.tflags & STRATA_NBD_FLAG_SEND_TRIM));
}
END_TEST

static char *sc_options(void *opaque)
{
    int fd = raw_connect();
    uint32_t opt, type, len;
    uint8_t *p;
    uint8_t junk[8] = { 0 };
    const uint16_t infos[] = { STRATA_NBD_INFO_NAME,
                               STRATA_NBD_INFO_DESCRIPTION };
    bool saw_name = false, saw_desc = false, saw_export = false;

    SCHECK(fd >= 0 && raw_greet(fd));
    /* An unknown option is refused, and negotiation goes on. */
    SCHECK(raw_send_opt(fd, 0x4242, junk, sizeof(junk)));
    SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
    g_free(p);
    SCHECK(opt == 0x4242 && type == STRATA_NBD_REP_ERR_UNSUP);
    /* STARTTLS without TLS: policy. */
    SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_STARTTLS, NULL, 0));
    SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
    g_free(p);
    SCHECK(type == STRATA_NBD_REP_ERR_POLICY);
    /* LIST: one SERVER reply per export, then ACK. */
    SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_LIST, NULL, 0));
    SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
    SCHECK(type == STRATA_NBD_REP_SERVER && len >= 6);
    SCHECK(r32(p) == 2 && !memcmp(p + 4, "e0", 2));
    SCHECK(!strcmp((char *)p + 6, "first disk"));
    g_free(p);
    SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
    g_free(p);
    SCHECK(type == STRATA_NBD_REP_ACK);
    /* LIST with a payload is invalid. */
    SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_LIST, junk, 4));
    SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
    g_free(p);
    SCHECK(type == STRATA_NBD_REP_ERR_INVALID);
    /* SET_META_CONTEXT before structured replies is invalid. */
    SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_SET_META_CONTEXT, junk, 8));
    SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
    g_free(p);
    SCHECK(type == STRATA_NBD_REP_ERR_INVALID);
    /* LIST_META_CONTEXT with no query lists both contexts. */
    {
        uint8_t b[10];
        int n = 0;
        w32(b, 2);
        memcpy(b + 4, "e0", 2);
        w32(b + 6, 0);
        SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_LIST_META_CONTEXT, b, 10));
        for (;;) {
            SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
            if (type != STRATA_NBD_REP_META_CONTEXT) {
                g_free(p);
                break;
            }
            n++;
            g_free(p);
        }
        SCHECK(type == STRATA_NBD_REP_ACK && n == 2);
    }
    /* INFO for an unknown export. */
    {
        g_autofree uint8_t *b = go_payload("nope", NULL, 0, &len);
        SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_INFO, b, len));
        SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
        g_free(p);
        SCHECK(type == STRATA_NBD_REP_ERR_UNKNOWN);
    }
    /* A GO whose lengths disagree. */
    {
        g_autofree uint8_t *b = go_payload("e0", NULL, 0, &len);
        w32(b, 200);
        SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_GO, b, len));
        SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
        g_free(p);
        SCHECK(type == STRATA_NBD_REP_ERR_INVALID);
    }
    /* INFO with name and description. */
    {
        g_autofree uint8_t *b = go_payload("e0", infos, 2, &len);
        SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_INFO, b, len));
    }
    for (;;) {
        SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
        if (type == STRATA_NBD_REP_ACK) {
            g_free(p);
            break;
        }
        SCHECK(type == STRATA_NBD_REP_INFO && len >= 2);
        switch (r16(p)) {
        case STRATA_NBD_INFO_NAME:
            saw_name = len == 4 && !memcmp(p + 2, "e0", 2);
            break;
        case STRATA_NBD_INFO_DESCRIPTION:
            saw_desc = !strcmp((char *)p + 2, "first disk");
            break;
        case STRATA_NBD_INFO_EXPORT:
            saw_export = len == 12 && r64(p + 2) == SIZE;
            break;
        }
        g_free(p);
    }
    SCHECK(saw_name && saw_desc && saw_export);
    /* ABORT: acknowledged, then the connection closes. */
    SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_ABORT, NULL, 0));
    SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
    g_free(p);
    SCHECK(type == STRATA_NBD_REP_ACK);
    SCHECK(raw_is_closed(fd));
    close(fd);
    return NULL;
}

START_TEST(test_options)
{
    char *res;

    add_disk(true);
    res = run_scenario(sc_options, NULL);
    ck_assert_msg(!res, "%s", res);
}
END_TEST

static char *sc_export_name(void *opaque)
{
    int fd = raw_connect();
    uint8_t b[10];

    SCHECK(fd >= 0 && raw_greet(fd));
    SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_EXPORT_NAME, "e0", 2));
    SCHECK(raw_read(fd, b, 10));
    SCHECK(r64(b) == SIZE);
    close(fd);

    /* An unknown name: the server can only hang up. */
    fd = raw_connect();
    SCHECK(fd >= 0 && raw_greet(fd));
    SCHECK(raw_send_opt(fd, STRATA_NBD_OPT_EXPORT_NAME, "zz", 2));
    SCHECK(raw_is_closed(fd));
    close(fd);
    return NULL;
}

START_TEST(test_export_name)
{
    char *res;

    add_disk(true);
    res = run_scenario(sc_export_name, NULL);
    ck_assert_msg(!res, "%s", res);
}
END_TEST

static char *sc_bad_handshake(void *opaque)
{
    uint8_t h[16] = "NOTMAGIC";
    uint8_t cf[4];
    int fd = raw_connect();

    /* Bad option magic. */
    SCHECK(fd >= 0 && raw_greet(fd));
    SCHECK(raw_write(fd, h, 16));
    SCHECK(raw_is_closed(fd));
    close(fd);

    /* Unknown client flags. */
    fd = raw_connect();
    {
        uint8_t g[18];
        SCHECK(raw_read(fd, g, 18));
    }
    w32(cf, 0x80000001);
    SCHECK(raw_write(fd, cf, 4));
    SCHECK(raw_is_closed(fd));
    close(fd);

    /* Vanishing in the middle of an option's payload. */
    fd = raw_connect();
    SCHECK(raw_greet(fd));
    w64(h, STRATA_NBD_OPTS_MAGIC);
    w32(h + 8, STRATA_NBD_OPT_GO);
    w32(h + 12, 1000);
    SCHECK(raw_write(fd, h, 16));
    SCHECK(raw_write(fd, h, 5));
    close(fd);

    /* An option too large to read is skipped and refused. */
    fd = raw_connect();
    SCHECK(raw_greet(fd));
    {
        uint32_t big = 100 * 1024, opt, type, len;
        g_autofree uint8_t *payload = g_malloc0(big);
        uint8_t *p;
        SCHECK(raw_send_opt(fd, 0x77, payload, big));
        SCHECK(raw_recv_rep(fd, &opt, &type, &p, &len));
        g_free(p);
        SCHECK(type == STRATA_NBD_REP_ERR_TOO_BIG);
    }
    close(fd);
    return NULL;
}

START_TEST(test_bad_handshake)
{
    char *res;

    add_disk(true);
    res = run_scenario(sc_bad_handshake, NULL);
    ck_assert_msg(!res, "%s", res);
    /* The server still serves. */
    GoArgs a = { "e0", 0, 0 };
    res = run_scenario(sc_go, &a);
    ck_assert_msg(!res, "%s", res);
    ck_assert_uint_eq(a.size, SIZE);
}
END_TEST

/* ---- transmission ---- */

static char *sc_write_read(void *opaque)
{
    uint64_t size, cookie;
    uint16_t tf;
    uint32_t err;
    int fd = raw_open("e0", false, false, &size, &tf);
    g_autofree uint8_t *buf = g_malloc(65536);
    g_autofree uint8_t *rd = g_malloc(65536);

    SCHECK(fd >= 0);
    /* The existing data. */
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, 7, 0, 4096, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, rd, 4096));
    SCHECK(err == 0 && cookie == 7 && rd[0] == 0x11 && rd[4095] == 0x11);

    memset(buf, 0xab, 65536);
    SCHECK(raw_send_req(fd, STRATA_NBD_CMD_FLAG_FUA, STRATA_NBD_CMD_WRITE,
                        8, 131072, 65536, buf));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == 0 && cookie == 8);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, 9, 131072, 65536,
                        NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, rd, 65536));
    SCHECK(err == 0 && cookie == 9 && !memcmp(buf, rd, 65536));

    /* Zeroes, trim, flush. */
    SCHECK(raw_send_req(fd, STRATA_NBD_CMD_FLAG_NO_HOLE,
                        STRATA_NBD_CMD_WRITE_ZEROES, 10, 131072, 4096,
                        NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == 0 && cookie == 10);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, 11, 131072, 8192, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, rd, 8192));
    SCHECK(err == 0 && rd[0] == 0 && rd[4095] == 0 && rd[4096] == 0xab);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_TRIM, 12, 0, 65536, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == 0 && cookie == 12);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_FLUSH, 13, 0, 0, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == 0 && cookie == 13);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_CACHE, 14, 0, 4096, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == 0 && cookie == 14);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_DISC, 15, 0, 0, NULL));
    SCHECK(raw_is_closed(fd));
    close(fd);
    return NULL;
}

START_TEST(test_write_read)
{
    char *res;
    g_autoptr(GError) err = NULL;
    uint8_t b[4];

    add_disk(true);
    res = run_scenario(sc_write_read, NULL);
    ck_assert_msg(!res, "%s", res);
    /* The data reached the node. */
    g_autoptr(StrataBackend) blk = strata_backend_new(ctx, "disk", false,
                                                      &err);
    ck_assert(blk);
    ck_assert_int_eq(strata_backend_pread(blk, 131072 + 4096, b, 4), 0);
    ck_assert_uint_eq(b[0], 0xab);
}
END_TEST

/* Large requests, many in flight: eight 1 MiB writes sent back to back,
 * then 24 reads (1 MiB, 2 MiB across the writes' boundaries, 4 KiB)
 * before any reply is read, so the server runs out of request slots,
 * keeps and drops buffers of two sizes, and its replies (24 MiB) queue
 * in the socket; every reply is matched by cookie and checked. */
#define BIG_SIZE (8 * 1024 * 1024)
#define MIB (1024 * 1024)

static uint8_t big_byte(uint64_t off)
{
    return (uint8_t)(0x40 + off / MIB);
}

static char *sc_big_pipelined(void *opaque)
{
    uint64_t size, cookie;
    uint16_t tf;
    uint32_t err;
    int fd = raw_open("big", false, false, &size, &tf);
    g_autofree uint8_t *buf = g_malloc(2 * MIB);
    g_autofree uint8_t *want = g_malloc(2 * MIB);
    struct { uint64_t off; uint32_t len; bool seen; } rd[24];

    SCHECK(fd >= 0 && size == BIG_SIZE);
    for (int i = 0; i < 8; i++) {
        memset(buf, big_byte((uint64_t)i * MIB), MIB);
        SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_WRITE, 100 + i,
                            (uint64_t)i * MIB, MIB, buf));
    }
    for (int i = 0; i < 8; i++) {
        SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
        SCHECK(err == 0 && cookie >= 100 && cookie < 108);
    }
    for (int i = 0; i < 24; i++) {
        uint64_t off = i < 8 ? (uint64_t)i * MIB
                     : i < 16 ? (uint64_t)(i - 8) * 768 * 1024
                     : (uint64_t)(i - 16) % 7 * MIB + MIB - 2048;
        uint32_t len = i < 8 ? MIB : i < 16 ? 2 * MIB : 4096;

        rd[i].off = off;
        rd[i].len = len;
        rd[i].seen = false;
        SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, i, off, len, NULL));
    }
    for (int n = 0; n < 24; n++) {
        uint8_t h[16];

        SCHECK(raw_read(fd, h, 16) &&
               r32(h) == STRATA_NBD_SIMPLE_REPLY_MAGIC && r32(h + 4) == 0);
        cookie = r64(h + 8);
        SCHECK(cookie < 24 && !rd[cookie].seen);
        rd[cookie].seen = true;
        SCHECK(raw_read(fd, buf, rd[cookie].len));
        for (uint32_t j = 0; j < rd[cookie].len; j++) {
            want[j] = big_byte(rd[cookie].off + j);
        }
        SCHECK(memcmp(buf, want, rd[cookie].len) == 0);
    }
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_DISC, 200, 0, 0, NULL));
    SCHECK(raw_is_closed(fd));
    close(fd);
    return NULL;
}

START_TEST(test_big_pipelined)
{
    g_autofree char *path = make_raw("big.raw", BIG_SIZE, 0, 0);
    char *res;

    add_node("driver=raw,node-name=big,file.driver=file,file.filename=%s",
             path);
    add_export("type=nbd,id=big,node-name=big,name=big,writable=on");
    res = run_scenario(sc_big_pipelined, NULL);
    ck_assert_msg(!res, "%s", res);
}
END_TEST

static char *sc_errors(void *opaque)
{
    bool writable = *(bool *)opaque;
    uint64_t size, cookie;
    uint16_t tf;
    uint32_t err;
    int fd = raw_open("e0", false, false, &size, &tf);
    g_autofree uint8_t *buf = g_malloc0(4096);

    SCHECK(fd >= 0);
    if (!writable) {
        SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_WRITE, 1, 0, 4096, buf));
        SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
        SCHECK(err == STRATA_NBD_EPERM && cookie == 1);
        SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_TRIM, 2, 0, 4096, NULL));
        SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
        SCHECK(err == STRATA_NBD_EPERM);
        SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_WRITE_ZEROES, 3, 0, 4096,
                            NULL));
        SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
        SCHECK(err == STRATA_NBD_EPERM);
    } else {
        /* Past the end: writes get ENOSPC (their payload consumed). */
        SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_WRITE, 4, SIZE - 2048,
                            4096, buf));
        SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
        SCHECK(err == STRATA_NBD_ENOSPC && cookie == 4);
        /* Flags a command does not take. */
        SCHECK(raw_send_req(fd, STRATA_NBD_CMD_FLAG_NO_HOLE,
                            STRATA_NBD_CMD_WRITE, 5, 0, 4096, buf));
        SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
        SCHECK(err == STRATA_NBD_EINVAL && cookie == 5);
    }
    /* Reads past the end, huge reads, offsets that wrap. */
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, 6, SIZE, 1, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == STRATA_NBD_EINVAL && cookie == 6);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, 7, 0,
                        STRATA_NBD_MAX_BUFFER + 1, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == STRATA_NBD_EINVAL);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, 8, UINT64_MAX - 10,
                        4096, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == STRATA_NBD_EINVAL);
    /* Unknown commands and flags. */
    SCHECK(raw_send_req(fd, 0, 99, 9, 0, 0, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == STRATA_NBD_EINVAL && cookie == 9);
    SCHECK(raw_send_req(fd, 0x8000, STRATA_NBD_CMD_FLUSH, 10, 0, 0, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == STRATA_NBD_EINVAL);
    /* Block status without meta contexts. */
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_BLOCK_STATUS, 11, 0, 4096,
                        NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == STRATA_NBD_EINVAL);
    /* Still in step: a good read works. */
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, 12, 0, 16, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, buf, 16));
    SCHECK(err == 0 && buf[0] == 0x11 && cookie == 12);
    /* A write too large to buffer ends the connection. */
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_WRITE, 13, 0,
                        STRATA_NBD_MAX_BUFFER + 1, NULL));
    SCHECK(raw_is_closed(fd));
    close(fd);

    /* A bad request magic ends it too. */
    fd = raw_open("e0", false, false, &size, &tf);
    SCHECK(fd >= 0);
    memset(buf, 0x5a, 28);
    SCHECK(raw_write(fd, buf, 28));
    SCHECK(raw_is_closed(fd));
    close(fd);
    return NULL;
}

/*
 * How many requests the server takes at once on one connection.  Every
 * read of a null-co node with latency-ns is held HOLD_NS: the client
 * sends @n reads of @len each, waits a while and hangs up without
 * reading a reply, while the loop's thread samples the node's requests
 * in flight.  The server stops reading the socket at its limit, so the
 * most ever seen is that limit; the requests left in the socket are
 * still read and run (their replies go nowhere) until none is left.
 */
#define HOLD_NS (1500 * 1000 * 1000)

typedef struct {
    int n;
    uint32_t len;
} HeldArgs;

static char *sc_held(void *opaque)
{
    HeldArgs *a = opaque;
    uint64_t size;
    uint16_t tf;
    int fd = raw_open("held", true, false, &size, &tf);

    SCHECK(fd >= 0);
    for (int i = 0; i < a->n; i++) {
        /* DF: read, even what reads as zeroes (no hole chunk). */
        SCHECK(raw_send_req(fd, STRATA_NBD_CMD_FLAG_DF, STRATA_NBD_CMD_READ,
                            i, (uint64_t)i * a->len % size, a->len, NULL));
    }
    /* Long enough for the server to take all it will take, even on a
     * loaded machine; short of the first reads' end. */
    g_usleep(HOLD_NS / 1000 / 3);
    close(fd);
    return NULL;
}

static unsigned most_in_flight(int n, uint32_t len)
{
    HeldArgs a = { .n = n, .len = len };
    InFlightWatch w;
    StrataNode *null;
    int64_t deadline;
    char *res;

    /* The export counts its requests in flight on the node it exports
     * as well: the node under it sees each once. */
    add_node("driver=raw,node-name=held,file.driver=null-co,"
             "file.node-name=null,file.size=%" G_GUINT64_FORMAT
             ",file.latency-ns=%d", (guint64)1 << 30, HOLD_NS);
    add_export("type=nbd,id=held,node-name=held,name=held");
    null = strata_context_find_node(ctx, "null");
    ck_assert(null != NULL);
    in_flight_watch(&w, null);
    res = run_scenario(sc_held, &a);
    ck_assert_msg(!res, "%s", res);
    /* Every request read from the socket runs to its end. */
    deadline = g_get_monotonic_time() + 30 * G_USEC_PER_SEC;
    while (null->in_flight && g_get_monotonic_time() < deadline) {
        strata_loop_iterate(ctx->loop, true);
    }
    ck_assert_uint_eq(null->in_flight, 0);
    in_flight_unwatch(&w);
    return w.most;
}

/* Up to STRATA_NBD_SERVER_MAX_REQS requests at once: of 100 small
 * reads, 64.  QEMU's server takes 16, which leaves a client at depth
 * 32 with half its requests in the socket. */
G_STATIC_ASSERT(STRATA_NBD_SERVER_MAX_REQS >= 32);

START_TEST(test_requests_in_flight)
{
    ck_assert_uint_eq(most_in_flight(100, 4096), STRATA_NBD_SERVER_MAX_REQS);
}
END_TEST

/* Large ones are bounded by the bytes their buffers take: of 20 reads of
 * the largest size, 16. */
START_TEST(test_request_bytes_in_flight)
{
    ck_assert_uint_eq(most_in_flight(20, STRATA_NBD_MAX_BUFFER),
                      STRATA_NBD_SERVER_MAX_REQ_BYTES / STRATA_NBD_MAX_BUFFER);
}
END_TEST

START_TEST(test_errors_writable)
{
    bool writable = true;
    char *res;

    add_disk(true);
    res = run_scenario(sc_errors, &writable);
    ck_assert_msg(!res, "%s", res);
}
END_TEST

START_TEST(test_errors_readonly)
{
    bool writable = false;
    char *res;

    add_disk(false);
    res = run_scenario(sc_errors, &writable);
    ck_assert_msg(!res, "%s", res);
}
END_TEST

static char *sc_vanish(void *opaque)
{
    uint64_t size;
    uint16_t tf;
    int fd = raw_open("e0", false, false, &size, &tf);
    uint8_t h[28] = { 0 };
    g_autofree uint8_t *buf = g_malloc0(65536);

    /* Half a request header. */
    SCHECK(fd >= 0);
    w32(h, STRATA_NBD_REQUEST_MAGIC);
    SCHECK(raw_write(fd, h, 10));
    close(fd);

    /* A write whose payload stops half way. */
    fd = raw_open("e0", false, false, &size, &tf);
    SCHECK(fd >= 0);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_WRITE, 1, 0, 65536, NULL));
    SCHECK(raw_write(fd, buf, 1000));
    close(fd);

    /* Many requests, then gone before reading a reply. */
    fd = raw_open("e0", true, false, &size, &tf);
    SCHECK(fd >= 0);
    for (int i = 0; i < 64; i++) {
        SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, i, 0, 65536, NULL));
    }
    close(fd);
    return NULL;
}

START_TEST(test_vanish)
{
    char *res;

    add_disk(true);
    res = run_scenario(sc_vanish, NULL);
    ck_assert_msg(!res, "%s", res);
    /* Every connection is gone once the loop has run a little. */
    StrataExport *exp = strata_export_find(ctx, "e0");
    for (int i = 0; i < 2000 && strata_export_client_count(exp); i++) {
        strata_loop_iterate(ctx->loop, false);
        g_usleep(1000);
    }
    ck_assert_uint_eq(strata_export_client_count(exp), 0);
    /* The half-written request wrote nothing. */
    GoArgs a = { "e0", 0, 0 };
    res = run_scenario(sc_go, &a);
    ck_assert_msg(!res, "%s", res);
    ck_assert(strata_export_del(ctx, "e0", false, NULL));
    ck_assert_int_eq(events_deleted, 1);
}
END_TEST

static char *sc_pipelined(void *opaque)
{
    uint64_t size, cookie;
    uint16_t tf, flags, type;
    uint32_t len;
    int fd = raw_open("e0", true, false, &size, &tf);
    bool seen[40] = { false };
    uint8_t *p;

    SCHECK(fd >= 0);
    SCHECK(tf & STRATA_NBD_FLAG_SEND_DF);
    /* More requests than the server takes at once. */
    for (int i = 0; i < 40; i++) {
        SCHECK(raw_send_req(fd, i % 2 ? STRATA_NBD_CMD_FLAG_DF : 0,
                            STRATA_NBD_CMD_READ, 100 + i, i * 4096, 4096,
                            NULL));
    }
    for (int i = 0; i < 40; i++) {
        SCHECK(raw_recv_chunk(fd, &flags, &type, &cookie, &p, &len));
        SCHECK(type == STRATA_NBD_REPLY_TYPE_OFFSET_DATA);
        SCHECK(flags & STRATA_NBD_REPLY_FLAG_DONE);
        SCHECK(cookie >= 100 && cookie < 140 && !seen[cookie - 100]);
        seen[cookie - 100] = true;
        SCHECK(len == 8 + 4096);
        SCHECK(r64(p) == (cookie - 100) * 4096);
        SCHECK(p[8] == ((cookie - 100) * 4096 < 65536 ? 0x11 : 0));
        g_free(p);
    }
    /* A structured read error. */
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, 1, SIZE, 4096, NULL));
    SCHECK(raw_recv_chunk(fd, &flags, &type, &cookie, &p, &len));
    SCHECK(type == STRATA_NBD_REPLY_TYPE_ERROR && cookie == 1);
    SCHECK(len >= 6 && r32(p) == STRATA_NBD_EINVAL);
    SCHECK(r16(p + 4) == len - 6);
    g_free(p);
    /* Non-read commands get simple replies. */
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_FLUSH, 2, 0, 0, NULL));
    {
        uint32_t err;
        SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
        SCHECK(err == 0 && cookie == 2);
    }
    close(fd);
    return NULL;
}

START_TEST(test_pipelined_structured)
{
    char *res;

    add_disk(true);
    res = run_scenario(sc_pipelined, NULL);
    ck_assert_msg(!res, "%s", res);
}
END_TEST

/* One structured READ of [@off, @off + @len) with @flags: the single
 * chunk that answers it must be of @want_type and DONE; a data chunk's
 * bytes must all be @byte (or, with @byte < 0, any). */
static bool read_chunk_is(int fd, uint16_t flags, uint64_t off, uint32_t len,
                          uint16_t want_type, int byte)
{
    static uint64_t next_cookie = 1000;
    uint64_t cookie, want_cookie = next_cookie++;
    uint16_t cflags, type;
    uint32_t plen;
    uint8_t *p = NULL;
    bool ok = raw_send_req(fd, flags, STRATA_NBD_CMD_READ, want_cookie, off,
                           len, NULL) &&
              raw_recv_chunk(fd, &cflags, &type, &cookie, &p, &plen) &&
              cookie == want_cookie && type == want_type &&
              (cflags & STRATA_NBD_REPLY_FLAG_DONE) && plen >= 8 &&
              r64(p) == off;

    if (ok && type == STRATA_NBD_REPLY_TYPE_OFFSET_HOLE) {
        ok = plen == 12 && r32(p + 8) == len;
    } else if (ok) {
        ok = plen == 8 + len;
        for (uint32_t i = 0; ok && byte >= 0 && i < len; i++) {
            ok = p[8 + i] == byte;
        }
    }
    g_free(p);
    return ok;
}

static char *sc_sparse_reads(void *opaque)
{
    uint64_t size, cookie;
    uint16_t tf;
    uint32_t err;
    int fd = raw_open("q", true, false, &size, &tf);
    g_autofree uint8_t *buf = g_malloc(4096);
    g_autofree uint8_t *rd = g_malloc(4096);

    SCHECK(fd >= 0);
    /* Nothing allocated: a hole chunk, no data. */
    SCHECK(read_chunk_is(fd, 0, 0, 65536, STRATA_NBD_REPLY_TYPE_OFFSET_HOLE,
                         -1));
    /* DF asks for the data in one chunk: the zeroes themselves. */
    SCHECK(read_chunk_is(fd, STRATA_NBD_CMD_FLAG_DF, 0, 65536,
                         STRATA_NBD_REPLY_TYPE_OFFSET_DATA, 0));
    memset(buf, 0x3c, 4096);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_WRITE, 2, 69632, 4096, buf));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == 0 && cookie == 2);
    /* Data: a data chunk; data and zeroes mixed: read and sent whole;
     * a range next to the data that is still a hole: a hole. */
    SCHECK(read_chunk_is(fd, 0, 69632, 4096,
                         STRATA_NBD_REPLY_TYPE_OFFSET_DATA, 0x3c));
    SCHECK(read_chunk_is(fd, 0, 65536, 131072,
                         STRATA_NBD_REPLY_TYPE_OFFSET_DATA, -1));
    SCHECK(read_chunk_is(fd, 0, 131072, 65536,
                         STRATA_NBD_REPLY_TYPE_OFFSET_HOLE, -1));
    /* Zeroes written as zeroes read as a hole too. */
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_WRITE_ZEROES, 3, 65536, 65536,
                        NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == 0 && cookie == 3);
    SCHECK(read_chunk_is(fd, 0, 65536, 65536,
                         STRATA_NBD_REPLY_TYPE_OFFSET_HOLE, -1));
    close(fd);

    /* Without structured replies: simple replies carry the zeroes. */
    fd = raw_open("q", false, false, &size, &tf);
    SCHECK(fd >= 0);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, 4, 0, 4096, NULL));
    memset(rd, 0xff, 4096);
    SCHECK(raw_recv_simple(fd, &err, &cookie, rd, 4096));
    SCHECK(err == 0 && cookie == 4 && rd[0] == 0 && rd[4095] == 0);
    close(fd);

    /* null-co reads as zeroes only with read-zeroes=on. */
    fd = raw_open("zeroes", true, false, &size, &tf);
    SCHECK(fd >= 0);
    SCHECK(read_chunk_is(fd, 0, 4096, 4096,
                         STRATA_NBD_REPLY_TYPE_OFFSET_HOLE, -1));
    close(fd);
    fd = raw_open("garbage", true, false, &size, &tf);
    SCHECK(fd >= 0);
    SCHECK(read_chunk_is(fd, 0, 4096, 4096,
                         STRATA_NBD_REPLY_TYPE_OFFSET_DATA, -1));
    close(fd);

    /* raw passes its file's status through, as QEMU's raw does: raw
     * over null-co (how stratad and QSD are given a null device) and
     * raw over the qcow2 node answer as their child would. */
    fd = raw_open("raw-zeroes", true, false, &size, &tf);
    SCHECK(fd >= 0);
    SCHECK(read_chunk_is(fd, 0, 4096, 4096,
                         STRATA_NBD_REPLY_TYPE_OFFSET_HOLE, -1));
    close(fd);
    /* Without read-zeroes, raw over null-co is not known to be zero
     * (QEMU sends the data too). */
    fd = raw_open("raw-garbage", true, false, &size, &tf);
    SCHECK(fd >= 0);
    SCHECK(read_chunk_is(fd, 0, 4096, 4096,
                         STRATA_NBD_REPLY_TYPE_OFFSET_DATA, -1));
    close(fd);
    fd = raw_open("raw-q", true, false, &size, &tf);
    SCHECK(fd >= 0);
    memset(buf, 0x5d, 4096);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_WRITE, 5, 196608, 4096, buf));
    SCHECK(raw_recv_simple(fd, &err, &cookie, NULL, 0));
    SCHECK(err == 0 && cookie == 5);
    SCHECK(read_chunk_is(fd, 0, 196608, 4096,
                         STRATA_NBD_REPLY_TYPE_OFFSET_DATA, 0x5d));
    SCHECK(read_chunk_is(fd, 0, 262144, 65536,
                         STRATA_NBD_REPLY_TYPE_OFFSET_HOLE, -1));
    close(fd);
    return NULL;
}

/* Structured reads of what reads as zeroes get hole chunks, where the
 * node knows that without I/O (qcow2, null-co); a raw file's holes are
 * sent as data (sc_pipelined). */
START_TEST(test_sparse_reads)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) o = json_object_new();
    g_autofree char *path = g_build_filename(dir, "sparse.qcow2", NULL);
    char *res;

    json_object_set_int_member(o, "size", SIZE);
    ck_assert_msg(strata_qcow2_create(ctx, path, o, &err), "%s",
                  err ? err->message : "");
    add_node("driver=qcow2,node-name=q,file.driver=file,file.filename=%s",
             path);
    add_export("type=nbd,id=eq,node-name=q,name=q,writable=on");
    add_node("driver=null-co,node-name=z,size=%d,read-zeroes=on", SIZE);
    add_export("type=nbd,id=ez,node-name=z,name=zeroes");
    add_node("driver=null-co,node-name=g,size=%d", SIZE);
    add_export("type=nbd,id=eg,node-name=g,name=garbage");
    add_node("driver=raw,node-name=rz,file=z");
    add_export("type=nbd,id=erz,node-name=rz,name=raw-zeroes");
    add_node("driver=raw,node-name=rg,file=g");
    add_export("type=nbd,id=erg,node-name=rg,name=raw-garbage");
    add_node("driver=raw,node-name=rq,file=q");
    add_export("type=nbd,id=erq,node-name=rq,name=raw-q,writable=on");
    res = run_scenario(sc_sparse_reads, NULL);
    ck_assert_msg(!res, "%s", res);
}
END_TEST

static char *sc_block_status(void *opaque)
{
    uint64_t size, cookie;
    uint16_t tf, flags, type;
    uint32_t len;
    int fd = raw_open("e0", true, true, &size, &tf);
    uint8_t *p;
    bool got_base = false, got_depth = false;

    SCHECK(fd >= 0);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_BLOCK_STATUS, 5, 0, SIZE,
                        NULL));
    do {
        SCHECK(raw_recv_chunk(fd, &flags, &type, &cookie, &p, &len));
        SCHECK(type == STRATA_NBD_REPLY_TYPE_BLOCK_STATUS && cookie == 5);
        SCHECK(len >= 12 && (len - 4) % 8 == 0);
        uint32_t id = r32(p);
        uint64_t total = 0;
        for (uint32_t o = 4; o < len; o += 8) {
            total += r32(p + o);
        }
        SCHECK(total <= SIZE);
        if (id == STRATA_NBD_META_ID_BASE_ALLOCATION) {
            /* 64 KiB of data, then a hole that reads as zeroes. */
            SCHECK(r32(p + 4) == 65536 && r32(p + 8) == 0);
            SCHECK(len >= 20 && (r32(p + 16) & STRATA_NBD_STATE_HOLE));
            SCHECK(total == SIZE);
            got_base = true;
        } else {
            SCHECK(id == STRATA_NBD_META_ID_ALLOCATION_DEPTH);
            /* A raw file decides all its content. */
            SCHECK(r32(p + 8) == 1);
            got_depth = true;
        }
        g_free(p);
    } while (!(flags & STRATA_NBD_REPLY_FLAG_DONE));
    SCHECK(got_base && got_depth);

    /* REQ_ONE: a single extent per context. */
    SCHECK(raw_send_req(fd, STRATA_NBD_CMD_FLAG_REQ_ONE,
                        STRATA_NBD_CMD_BLOCK_STATUS, 6, 0, SIZE, NULL));
    do {
        SCHECK(raw_recv_chunk(fd, &flags, &type, &cookie, &p, &len));
        SCHECK(len == 12);
        g_free(p);
    } while (!(flags & STRATA_NBD_REPLY_FLAG_DONE));
    /* Out of range. */
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_BLOCK_STATUS, 7, SIZE, 1,
                        NULL));
    SCHECK(raw_recv_chunk(fd, &flags, &type, &cookie, &p, &len));
    SCHECK(type == STRATA_NBD_REPLY_TYPE_ERROR && r32(p) == STRATA_NBD_EINVAL);
    g_free(p);
    close(fd);
    return NULL;
}

START_TEST(test_block_status)
{
    char *res;

    add_disk(true);
    res = run_scenario(sc_block_status, NULL);
    ck_assert_msg(!res, "%s", res);
}
END_TEST

static char *sc_eio(void *opaque)
{
    uint64_t size, cookie;
    uint16_t tf;
    uint32_t err;
    int fd = raw_open("e0", false, false, &size, &tf);
    uint8_t buf[512];

    SCHECK(fd >= 0);
    SCHECK(raw_send_req(fd, 0, STRATA_NBD_CMD_READ, 1, 0, 512, NULL));
    SCHECK(raw_recv_simple(fd, &err, &cookie, buf, 512));
    SCHECK(err == STRATA_NBD_EIO && cookie == 1);
    close(fd);
    return NULL;
}

START_TEST(test_blkdebug_eio)
{
    g_autofree char *path = make_raw("disk.raw", SIZE, 0, 0);
    char *res;

    add_node("driver=blkdebug,node-name=dbg,image.driver=file,"
             "image.filename=%s,inject-error.0.event=read_aio,"
             "inject-error.0.errno=5", path);
    add_export("type=nbd,id=e0,node-name=dbg,name=e0");
    res = run_scenario(sc_eio, NULL);
    ck_assert_msg(!res, "%s", res);
}
END_TEST

/* ---- deleting with clients ---- */

typedef struct {
    gint connected;
    gint release;
    bool closed;
} HoldArgs;

static char *sc_hold(void *opaque)
{
    HoldArgs *a = opaque;
    uint64_t size;
    uint16_t tf;
    int fd = raw_open("e0", false, false, &size, &tf);

    SCHECK(fd >= 0);
    g_atomic_int_set(&a->connected, 1);
    g_main_context_wakeup(NULL);
    a->closed = raw_is_closed(fd);
    close(fd);
    return NULL;
}

static gpointer hold_thread(gpointer opaque)
{
    return sc_hold(opaque);
}

START_TEST(test_del_with_client)
{
    g_autoptr(GError) err = NULL;
    HoldArgs a = { 0 };
    GThread *t;
    char *res;

    add_disk(true);
    t = g_thread_new("holder", hold_thread, &a);
    while (!g_atomic_int_get(&a.connected) ||
           !strata_export_client_count(strata_export_find(ctx, "e0"))) {
        strata_loop_iterate(ctx->loop, true);
    }
    ck_assert(!strata_export_del(ctx, "e0", false, &err));
    ck_assert_str_eq(err->message, "export 'e0' still in use");
    g_clear_error(&err);
    ck_assert(strata_export_del(ctx, "e0", true, &err));
    /* The event waits for the client to go. */
    ck_assert_int_eq(events_deleted, 0);
    g_autoptr(JsonArray) arr = strata_export_query(ctx);
    ck_assert_int_eq(json_array_get_length(arr), 1);
    ck_assert(json_object_get_boolean_member(
        json_array_get_object_element(arr, 0), "shutting-down"));
    while (events_deleted == 0) {
        strata_loop_iterate(ctx->loop, true);
    }
    res = g_thread_join(t);
    ck_assert_msg(!res, "%s", res);
    ck_assert(a.closed);
    ck_assert_int_eq(events_deleted, 1);
    ck_assert_str_eq(last_event_id, "e0");
    ck_assert(!strata_export_find(ctx, "e0"));
}
END_TEST

START_TEST(test_stop_with_client)
{
    HoldArgs a = { 0 };
    GThread *t;
    char *res;

    add_disk(true);
    t = g_thread_new("holder", hold_thread, &a);
    while (!g_atomic_int_get(&a.connected) ||
           !strata_export_client_count(strata_export_find(ctx, "e0"))) {
        strata_loop_iterate(ctx->loop, true);
    }
    /* The event comes before stop returns. */
    ck_assert(strata_nbd_server_stop(ctx, NULL));
    ck_assert_int_eq(events_deleted, 1);
    res = g_thread_join(t);
    ck_assert_msg(!res, "%s", res);
    ck_assert(a.closed);
}
END_TEST

START_TEST(test_context_free_with_client)
{
    HoldArgs a = { 0 };
    GThread *t;
    char *res;

    add_disk(true);
    t = g_thread_new("holder", hold_thread, &a);
    while (!g_atomic_int_get(&a.connected) ||
           !strata_export_client_count(strata_export_find(ctx, "e0"))) {
        strata_loop_iterate(ctx->loop, true);
    }
    /* Quitting deletes the export, with its event. */
    strata_context_free(ctx);
    ctx = NULL;
    ck_assert_int_eq(events_deleted, 1);
    res = g_thread_join(t);
    ck_assert_msg(!res, "%s", res);
    ck_assert(a.closed);
}
END_TEST

static char *sc_max_conn(void *opaque)
{
    uint64_t size;
    uint16_t tf;
    int fd1 = raw_open("e0", false, false, &size, &tf);
    int fd2;

    SCHECK(fd1 >= 0);
    /* The second connection is accepted and closed at once. */
    fd2 = raw_connect();
    SCHECK(fd2 >= 0);
    SCHECK(raw_is_closed(fd2));
    close(fd2);
    close(fd1);
    return NULL;
}

START_TEST(test_max_connections)
{
    g_autoptr(GSocketAddress) sa = NULL;
    char *res;

    ck_assert(strata_nbd_server_stop(ctx, NULL));
    sa = g_unix_socket_address_new(sock_path);
    ck_assert(strata_nbd_server_start(ctx, sa, 1, NULL));
    add_disk(false);
    res = run_scenario(sc_max_conn, NULL);
    ck_assert_msg(!res, "%s", res);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("nbd");

    strata_test_add(s, "/nbd/io/big-pipelined", test_big_pipelined, setup,
                    teardown);
    strata_test_add(s, "/nbd/server/start-stop", test_server_start_stop,
                    setup, teardown);
    strata_test_add(s, "/nbd/server/legacy-addr-errors",
                    test_legacy_addr_errors, setup, teardown);
    strata_test_add(s, "/nbd/server/max-connections", test_max_connections,
                    setup, teardown);
    strata_test_add(s, "/nbd/export/add-errors", test_export_add_errors,
                    setup, teardown);
    strata_test_add(s, "/nbd/export/query", test_export_query, setup,
                    teardown);
    strata_test_add(s, "/nbd/export/del-with-client", test_del_with_client,
                    setup, teardown);
    strata_test_add(s, "/nbd/export/stop-with-client",
                    test_stop_with_client, setup, teardown);
    strata_test_add(s, "/nbd/export/context-free-with-client",
                    test_context_free_with_client, setup, teardown);
    strata_test_add(s, "/nbd/handshake/go", test_go, setup, teardown);
    strata_test_add(s, "/nbd/handshake/go-readonly", test_go_readonly_flags,
                    setup, teardown);
    strata_test_add(s, "/nbd/handshake/options", test_options, setup,
                    teardown);
    strata_test_add(s, "/nbd/handshake/export-name", test_export_name,
                    setup, teardown);
    strata_test_add(s, "/nbd/handshake/hostile", test_bad_handshake, setup,
                    teardown);
    strata_test_add(s, "/nbd/io/write-read", test_write_read, setup,
                    teardown);
    strata_test_add(s, "/nbd/io/errors-writable", test_errors_writable,
                    setup, teardown);
    strata_test_add(s, "/nbd/io/errors-readonly", test_errors_readonly,
                    setup, teardown);
    strata_test_add(s, "/nbd/io/vanish", test_vanish, setup, teardown);
    strata_test_add(s, "/nbd/io/pipelined-structured",
                    test_pipelined_structured, setup, teardown);
    strata_test_add(s, "/nbd/io/sparse-reads", test_sparse_reads, setup,
                    teardown);
    strata_test_add(s, "/nbd/io/block-status", test_block_status, setup,
                    teardown);
    strata_test_add(s, "/nbd/io/blkdebug-eio", test_blkdebug_eio, setup,
                    teardown);
    strata_test_add(s, "/nbd/io/requests-in-flight", test_requests_in_flight,
                    setup, teardown);
    strata_test_add(s, "/nbd/io/request-bytes-in-flight",
                    test_request_bytes_in_flight, setup, teardown);
    return strata_test_run(s);
}
