/* Tests of the STRATA_ERROR domain and its QMP classes. */
#include <check.h>
#include <gio/gio.h>

#include "strata-util.h"
#include "test-util.h"

START_TEST(test_quark)
{
    ck_assert_str_eq(g_quark_to_string(STRATA_ERROR), "strata-error-quark");
    ck_assert_uint_eq(STRATA_ERROR, strata_error_quark());
    ck_assert_uint_ne(STRATA_ERROR, G_IO_ERROR);
}
END_TEST

static const char *
class_of(GQuark domain, int code)
{
    g_autoptr(GError) error = g_error_new_literal(domain, code, "x");
    return strata_error_class_name(error);
}

START_TEST(test_classes)
{
    ck_assert_str_eq(class_of(STRATA_ERROR, STRATA_ERROR_COMMAND_NOT_FOUND),
                     "CommandNotFound");
    ck_assert_str_eq(class_of(STRATA_ERROR, STRATA_ERROR_DEVICE_NOT_FOUND),
                     "DeviceNotFound");
    ck_assert_str_eq(class_of(STRATA_ERROR, STRATA_ERROR_DEVICE_NOT_ACTIVE),
                     "DeviceNotActive");

    static const StrataErrorCode generic[] = {
        STRATA_ERROR_FAILED, STRATA_ERROR_INVALID_ARGUMENT,
        STRATA_ERROR_NOT_FOUND, STRATA_ERROR_EXISTS, STRATA_ERROR_BUSY,
        STRATA_ERROR_PERMISSION, STRATA_ERROR_IO,
        STRATA_ERROR_NOT_SUPPORTED, STRATA_ERROR_CORRUPT,
    };
    for (size_t i = 0; i < G_N_ELEMENTS(generic); i++) {
        ck_assert_str_eq(class_of(STRATA_ERROR, generic[i]), "GenericError");
    }
    /* A code from a newer peer or a cast integer stays generic. */
    ck_assert_str_eq(class_of(STRATA_ERROR, 9999), "GenericError");
    ck_assert_str_eq(class_of(STRATA_ERROR, -1), "GenericError");
}
END_TEST

START_TEST(test_other_domains)
{
    /* Same code numbers in another domain must not leak a QMP class. */
    ck_assert_str_eq(class_of(G_IO_ERROR, STRATA_ERROR_DEVICE_NOT_FOUND),
                     "GenericError");
    ck_assert_str_eq(class_of(G_FILE_ERROR, STRATA_ERROR_COMMAND_NOT_FOUND),
                     "GenericError");
    ck_assert_str_eq(strata_error_class_name(NULL), "GenericError");
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/error/quark", test_quark },
        { "/error/class/strata", test_classes },
        { "/error/class/other-domains", test_other_domains },
    };

    return strata_test_main("error", tests, NULL, NULL);
}
