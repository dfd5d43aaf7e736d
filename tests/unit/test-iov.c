/* Tests of scatter/gather vectors and the zero detector. */
#include <check.h>
#include <string.h>
#include <glib.h>

#include "iov-private.h"
#include "test-util.h"

START_TEST(test_init_buf)
{
    char buf[100];
    StrataIOVec qiov;

    strata_iov_init_buf(&qiov, buf, sizeof(buf));
    ck_assert_int_eq(qiov.niov, 1);
    ck_assert_uint_eq(qiov.size, sizeof(buf));
    /* No allocation: the element lives inside the struct. */
    ck_assert_ptr_eq(qiov.iov, &qiov.local);
    ck_assert_ptr_eq(qiov.iov[0].iov_base, buf);
    ck_assert_int_eq(qiov.nalloc, -1);
    strata_iov_cleanup(&qiov);
    ck_assert_ptr_null(qiov.iov);
}
END_TEST

START_TEST(test_add_grow)
{
    char buf[4096];
    StrataIOVec qiov;

    strata_iov_init(&qiov, 1);
    for (int i = 0; i < 40; i++) {
        strata_iov_add(&qiov, buf + i * 100, 100);
    }
    strata_iov_add(&qiov, buf, 0);  /* empty pieces are dropped */
    ck_assert_int_eq(qiov.niov, 40);
    ck_assert_uint_eq(qiov.size, 4000);
    ck_assert_int_ge(qiov.nalloc, 40);
    ck_assert_ptr_eq(qiov.iov[39].iov_base, buf + 3900);

    strata_iov_reset(&qiov);
    ck_assert_int_eq(qiov.niov, 0);
    ck_assert_uint_eq(qiov.size, 0);
    strata_iov_add(&qiov, buf, 7);
    ck_assert_uint_eq(qiov.size, 7);
    strata_iov_cleanup(&qiov);
}
END_TEST

START_TEST(test_add_to_wrapped)
{
    char a[10], b[20], c[30];
    struct iovec ext[2] = { { a, sizeof(a) }, { b, sizeof(b) } };
    StrataIOVec qiov;

    /* Appending to a wrapped buffer turns it into an owning vector. */
    strata_iov_init_buf(&qiov, a, sizeof(a));
    strata_iov_add(&qiov, b, sizeof(b));
    ck_assert_int_eq(qiov.niov, 2);
    ck_assert_ptr_ne(qiov.iov, &qiov.local);
    ck_assert_ptr_eq(qiov.iov[0].iov_base, a);
    ck_assert_uint_eq(qiov.size, 30);
    strata_iov_cleanup(&qiov);

    /* An external array is copied, never written or freed. */
    strata_iov_init_external(&qiov, ext, 2);
    ck_assert_uint_eq(qiov.size, 30);
    strata_iov_add(&qiov, c, sizeof(c));
    ck_assert_int_eq(qiov.niov, 3);
    ck_assert_uint_eq(qiov.size, 60);
    ck_assert_ptr_ne(qiov.iov, ext);
    ck_assert_ptr_eq(ext[1].iov_base, b);
    strata_iov_cleanup(&qiov);
}
END_TEST

/* A vector over @buf cut into pieces of 1, 2, 3, ... bytes. */
static void
make_ragged(StrataIOVec *qiov, unsigned char *buf, size_t len)
{
    strata_iov_init(qiov, 0);
    size_t off = 0;
    for (size_t n = 1; off < len; n++) {
        size_t piece = MIN(n, len - off);
        strata_iov_add(qiov, buf + off, piece);
        off += piece;
    }
}

START_TEST(test_copy)
{
    unsigned char backing[200], flat[200], out[200];
    StrataIOVec qiov;

    for (int i = 0; i < 200; i++) {
        flat[i] = (unsigned char)(i * 7 + 1);
    }
    memset(backing, 0, sizeof(backing));
    make_ragged(&qiov, backing, sizeof(backing));
    ck_assert_int_gt(qiov.niov, 10);

    ck_assert_uint_eq(strata_iov_from_buf(&qiov, 0, flat, 200), 200);
    ck_assert_mem_eq(backing, flat, 200);

    /* Offsets inside a piece, lengths crossing many pieces. */
    memset(out, 0xee, sizeof(out));
    ck_assert_uint_eq(strata_iov_to_buf(&qiov, 13, out, 150), 150);
    ck_assert_mem_eq(out, flat + 13, 150);
    ck_assert_uint_eq(out[150], 0xee);

    /* Short at the end of the vector, nothing past it. */
    ck_assert_uint_eq(strata_iov_to_buf(&qiov, 190, out, 50), 10);
    ck_assert_uint_eq(strata_iov_to_buf(&qiov, 200, out, 5), 0);
    ck_assert_uint_eq(strata_iov_to_buf(&qiov, 5000, out, 5), 0);

    ck_assert_uint_eq(strata_iov_memset(&qiov, 50, 0xab, 20), 20);
    ck_assert_uint_eq(backing[49], flat[49]);
    ck_assert_uint_eq(backing[50], 0xab);
    ck_assert_uint_eq(backing[69], 0xab);
    ck_assert_uint_eq(backing[70], flat[70]);
    ck_assert_uint_eq(strata_iov_memset(&qiov, 195, 0, 100), 5);
    strata_iov_cleanup(&qiov);
}
END_TEST

START_TEST(test_concat)
{
    unsigned char buf[100];
    StrataIOVec src, dst;

    for (int i = 0; i < 100; i++) {
        buf[i] = (unsigned char)i;
    }
    make_ragged(&src, buf, sizeof(buf));
    strata_iov_init(&dst, 0);
    strata_iov_concat(&dst, &src, 10, 50);
    ck_assert_uint_eq(dst.size, 50);

    unsigned char out[50];
    ck_assert_uint_eq(strata_iov_to_buf(&dst, 0, out, 50), 50);
    ck_assert_mem_eq(out, buf + 10, 50);
    /* No data copy: the pieces point into the source buffer. */
    ck_assert_ptr_eq(dst.iov[0].iov_base, buf + 10);

    strata_iov_concat(&dst, &src, 0, 0);
    ck_assert_uint_eq(dst.size, 50);
    strata_iov_cleanup(&dst);
    strata_iov_cleanup(&src);
}
END_TEST

START_TEST(test_aligned)
{
    unsigned char *buf = g_malloc(8192 + 512);
    unsigned char *al = (unsigned char *)(((uintptr_t)buf + 511) &
                                          ~(uintptr_t)511);
    StrataIOVec qiov;

    strata_iov_init(&qiov, 0);
    strata_iov_add(&qiov, al, 4096);
    strata_iov_add(&qiov, al + 4096, 512);
    ck_assert(strata_iov_is_aligned(&qiov, 512));
    ck_assert(!strata_iov_is_aligned(&qiov, 4096));
    strata_iov_add(&qiov, al + 5000, 512);  /* base misaligned */
    ck_assert(!strata_iov_is_aligned(&qiov, 512));
    strata_iov_reset(&qiov);
    strata_iov_add(&qiov, al, 100);         /* length misaligned */
    ck_assert(!strata_iov_is_aligned(&qiov, 512));
    ck_assert(strata_iov_is_aligned(&qiov, 1));
    strata_iov_cleanup(&qiov);
    g_free(buf);
}
END_TEST

START_TEST(test_buffer_is_zero)
{
    size_t max = 1024;
    unsigned char *buf = g_malloc0(max + 64);

    /* Every start alignment and length, with one non-zero byte at each
     * position in turn: the head, the aligned middle and the tail. */
    for (size_t start = 0; start < 17; start++) {
        for (size_t len = 0; len < 300; len++) {
            unsigned char *p = buf + start;
            ck_assert(strata_buffer_is_zero(p, len));
            for (size_t i = 0; i < len; i++) {
                p[i] = 1;
                ck_assert_msg(!strata_buffer_is_zero(p, len),
                              "start %zu len %zu byte %zu", start, len, i);
                p[i] = 0;
            }
            /* Bytes just outside the range do not count. */
            if (start > 0) {
                p[-1] = 1;
            }
            p[len] = 1;
            ck_assert(strata_buffer_is_zero(p, len));
            if (start > 0) {
                p[-1] = 0;
            }
            p[len] = 0;
        }
    }
    buf[max - 1] = 0x80;
    ck_assert(!strata_buffer_is_zero(buf, max));
    ck_assert(strata_buffer_is_zero(buf, max - 1));
    ck_assert(strata_buffer_is_zero(NULL, 0));
    g_free(buf);
}
END_TEST

/* What a straightforward implementation would do; volatile keeps the
 * compiler from turning it into something cleverer. */
static bool
naive_is_zero(const unsigned char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (((const volatile unsigned char *)p)[i] != 0) {
            return false;
        }
    }
    return true;
}

/* Bytes per microsecond over about 50 ms. */
static double
zero_rate(bool (*fn)(const void *, size_t), const unsigned char *buf,
          size_t len)
{
    gint64 start = g_get_monotonic_time();
    gint64 elapsed;
    size_t total = 0;
    do {
        ck_assert(fn(buf, len));
        total += len;
        elapsed = g_get_monotonic_time() - start;
    } while (elapsed < 50000);
    return (double)total / (double)elapsed;
}

static bool
naive_wrapper(const void *buf, size_t len)
{
    return naive_is_zero(buf, len);
}

START_TEST(test_buffer_is_zero_speed)
{
    /* The write path scans every request for detect-zeroes: the
     * detector must be much faster than a byte loop. */
    size_t len = 1 << 20;
    unsigned char *buf = g_malloc0(len);
    double fast = zero_rate(strata_buffer_is_zero, buf, len);
    double slow = zero_rate(naive_wrapper, buf, len);
    ck_assert_msg(fast > 3 * slow, "%.0f MB/s vs byte loop %.0f MB/s",
                  fast, slow);
    g_free(buf);
}
END_TEST

START_TEST(test_iov_is_zero)
{
    unsigned char buf[300] = { 0 };
    StrataIOVec qiov;

    make_ragged(&qiov, buf, sizeof(buf));
    ck_assert(strata_iov_is_zero(&qiov, 0, 300));
    buf[150] = 9;
    ck_assert(!strata_iov_is_zero(&qiov, 0, 300));
    ck_assert(!strata_iov_is_zero(&qiov, 150, 1));
    ck_assert(strata_iov_is_zero(&qiov, 0, 150));
    ck_assert(strata_iov_is_zero(&qiov, 151, 149));
    ck_assert(strata_iov_is_zero(&qiov, 300, 0));
    /* Past the end there is nothing to be zero. */
    ck_assert(!strata_iov_is_zero(&qiov, 151, 150));
    ck_assert(!strata_iov_is_zero(&qiov, SIZE_MAX, 2));
    strata_iov_cleanup(&qiov);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/iov/init-buf", test_init_buf },
        { "/iov/add/grow", test_add_grow },
        { "/iov/add/wrapped", test_add_to_wrapped },
        { "/iov/copy", test_copy },
        { "/iov/concat", test_concat },
        { "/iov/aligned", test_aligned },
        { "/iov/is-zero", test_iov_is_zero },
        { "/iov/buffer-is-zero/exact", test_buffer_is_zero },
        { "/iov/buffer-is-zero/speed", test_buffer_is_zero_speed },
    };

    return strata_test_main("iov", tests, NULL, NULL);
}
