/* strata — the STRATA_ERROR domain and its QMP error classes. */
#include "strata-util.h"

G_DEFINE_QUARK(strata-error-quark, strata_error)

const char *
strata_error_class_name(const GError *error)
{
    /* QMP knows only a handful of classes; everything it does not name
     * travels as GenericError with the message carrying the detail. */
    if (error == NULL || error->domain != STRATA_ERROR) {
        return "GenericError";
    }
    switch ((StrataErrorCode)error->code) {
    case STRATA_ERROR_COMMAND_NOT_FOUND:
        return "CommandNotFound";
    case STRATA_ERROR_DEVICE_NOT_FOUND:
        return "DeviceNotFound";
    case STRATA_ERROR_DEVICE_NOT_ACTIVE:
        return "DeviceNotActive";
    case STRATA_ERROR_FAILED:
    case STRATA_ERROR_INVALID_ARGUMENT:
    case STRATA_ERROR_NOT_FOUND:
    case STRATA_ERROR_EXISTS:
    case STRATA_ERROR_BUSY:
    case STRATA_ERROR_PERMISSION:
    case STRATA_ERROR_IO:
    case STRATA_ERROR_NOT_SUPPORTED:
    case STRATA_ERROR_CORRUPT:
        break;
    }
    return "GenericError";
}
