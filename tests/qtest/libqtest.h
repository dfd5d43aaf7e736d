/* libqtest — start stratad on a scratch socket and speak QMP to it. */
#ifndef STRATA_LIBQTEST_H
#define STRATA_LIBQTEST_H

#include <stdbool.h>
#include <glib.h>
#include <json-glib/json-glib.h>

typedef struct QTestState QTestState;

/* Starts stratad --qmp DIR/qmp.sock @extra_args (space separated, may be
 * NULL) in a fresh scratch directory (its working directory), connects
 * and, when @negotiate, sends qmp_capabilities. */
QTestState *qtest_start(const char *extra_args, bool negotiate);
/* Kills the daemon (SIGKILL) if still running, removes the scratch dir. */
void qtest_end(QTestState *s);
/* Sends SIGTERM and waits: the exit status, or -1 on a timeout. */
int qtest_terminate(QTestState *s);
/* Waits for the daemon to exit by itself: the exit status or -1. */
int qtest_wait_exit(QTestState *s, int timeout_ms);

const char *qtest_dir(QTestState *s);
const char *qtest_socket(QTestState *s);
int qtest_pid(QTestState *s);
/* The greeting the first connection received. */
JsonNode *qtest_greeting(QTestState *s);

/* Sends raw bytes on the main connection. */
void qtest_send_raw(QTestState *s, const char *text, size_t len);
/* Next message that is not an event (events are queued); NULL on
 * timeout or EOF. (transfer full) */
JsonNode *qtest_receive(QTestState *s, int timeout_ms);
/* Sends @text and returns the reply. (transfer full) */
JsonNode *qtest_qmp(QTestState *s, const char *text);
/* Next event called @name (earlier events are dropped). */
JsonNode *qtest_wait_event(QTestState *s, const char *name, int timeout_ms);
/* Whether the main connection was closed by the daemon. */
bool qtest_eof(QTestState *s);

/* Accessors on replies. */
const char *qtest_error_class(JsonNode *reply);
const char *qtest_error_desc(JsonNode *reply);
bool qtest_is_return(JsonNode *reply);
/* The reply written back as compact JSON. (transfer full) */
char *qtest_to_string(JsonNode *node);

/* An extra client on the same daemon: a connected fd (not negotiated,
 * greeting not read). */
int qtest_connect(QTestState *s);

/* RSS of the daemon in KiB, or -1. */
long qtest_rss_kib(QTestState *s);

#endif
