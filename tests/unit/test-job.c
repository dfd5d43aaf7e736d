/* Unit tests of the job tables and of the backing string rule. */
#include <check.h>
#include <glib.h>

#include "../../block/job-private.h"
#include "test-util.h"

START_TEST(test_transitions)
{
    /* The happy path of a stream, and its failures. */
    ck_assert(strata_job_transition_allowed(STRATA_JOB_STATUS_UNDEFINED,
                                            STRATA_JOB_STATUS_CREATED));
    ck_assert(strata_job_transition_allowed(STRATA_JOB_STATUS_CREATED,
                                            STRATA_JOB_STATUS_RUNNING));
    ck_assert(strata_job_transition_allowed(STRATA_JOB_STATUS_RUNNING,
                                            STRATA_JOB_STATUS_WAITING));
    ck_assert(strata_job_transition_allowed(STRATA_JOB_STATUS_WAITING,
                                            STRATA_JOB_STATUS_PENDING));
    ck_assert(strata_job_transition_allowed(STRATA_JOB_STATUS_PENDING,
                                            STRATA_JOB_STATUS_CONCLUDED));
    ck_assert(strata_job_transition_allowed(STRATA_JOB_STATUS_PENDING,
                                            STRATA_JOB_STATUS_ABORTING));
    ck_assert(strata_job_transition_allowed(STRATA_JOB_STATUS_CONCLUDED,
                                            STRATA_JOB_STATUS_NULL));
    ck_assert(strata_job_transition_allowed(STRATA_JOB_STATUS_READY,
                                            STRATA_JOB_STATUS_STANDBY));
    /* What may never happen. */
    ck_assert(!strata_job_transition_allowed(STRATA_JOB_STATUS_PAUSED,
                                             STRATA_JOB_STATUS_ABORTING));
    ck_assert(!strata_job_transition_allowed(STRATA_JOB_STATUS_RUNNING,
                                             STRATA_JOB_STATUS_PENDING));
    ck_assert(!strata_job_transition_allowed(STRATA_JOB_STATUS_CONCLUDED,
                                             STRATA_JOB_STATUS_RUNNING));
    for (int s = 0; s < STRATA_JOB_STATUS__MAX; s++) {
        ck_assert(!strata_job_transition_allowed(STRATA_JOB_STATUS_NULL, s));
    }
}
END_TEST

START_TEST(test_verbs)
{
    int allowed[STRATA_JOB_VERB__MAX] = { 0 };

    for (int s = 0; s < STRATA_JOB_STATUS__MAX; s++) {
        for (int v = 0; v < STRATA_JOB_VERB__MAX; v++) {
            allowed[v] += strata_job_verb_allowed(s, v);
        }
    }
    /* §5.2 of the reference: the count of states per verb. */
    ck_assert_int_eq(allowed[STRATA_JOB_VERB_CANCEL], 7);
    ck_assert_int_eq(allowed[STRATA_JOB_VERB_PAUSE], 5);
    ck_assert_int_eq(allowed[STRATA_JOB_VERB_RESUME], 5);
    ck_assert_int_eq(allowed[STRATA_JOB_VERB_SET_SPEED], 5);
    ck_assert_int_eq(allowed[STRATA_JOB_VERB_COMPLETE], 2);
    ck_assert_int_eq(allowed[STRATA_JOB_VERB_FINALIZE], 1);
    ck_assert_int_eq(allowed[STRATA_JOB_VERB_DISMISS], 1);
    ck_assert(strata_job_verb_allowed(STRATA_JOB_STATUS_STANDBY,
                                      STRATA_JOB_VERB_COMPLETE));
    ck_assert(strata_job_verb_allowed(STRATA_JOB_STATUS_PENDING,
                                      STRATA_JOB_VERB_CANCEL));
    ck_assert(!strata_job_verb_allowed(STRATA_JOB_STATUS_ABORTING,
                                       STRATA_JOB_VERB_CANCEL));
    ck_assert(strata_job_verb_allowed(STRATA_JOB_STATUS_CONCLUDED,
                                      STRATA_JOB_VERB_DISMISS));
    ck_assert_str_eq(strata_job_status_name(STRATA_JOB_STATUS_STANDBY),
                     "standby");
}
END_TEST

START_TEST(test_ids_and_policies)
{
    StrataOnError p;

    ck_assert(strata_job_id_check("job0", NULL));
    ck_assert(strata_job_id_check("a-b_c.d", NULL));
    ck_assert(!strata_job_id_check("", NULL));
    ck_assert(!strata_job_id_check("bad id!", NULL));
    ck_assert(!strata_job_id_check("1job", NULL));
    {
        g_autoptr(JsonObject) args = json_object_new();
        g_autoptr(GError) err = NULL;

        json_object_set_string_member(args, "on-error", "enospc");
        json_object_set_string_member(args, "on-target-error", "explode");
        ck_assert(strata_job_parse_on_error(args, "on-error", &p, NULL));
        ck_assert_int_eq(p, STRATA_ON_ERROR_ENOSPC);
        ck_assert(strata_job_parse_on_error(args, "on-source-error", &p,
                                            NULL));
        ck_assert_int_eq(p, STRATA_ON_ERROR_REPORT);
        ck_assert(!strata_job_parse_on_error(args, "on-target-error", &p,
                                             &err));
        ck_assert_str_eq(err->message, "Parameter 'on-target-error' does "
                                       "not accept value 'explode'");
    }
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/job/transitions", test_transitions },
        { "/job/verbs", test_verbs },
        { "/job/ids-and-policies", test_ids_and_policies },
    };

    return strata_test_main("job", tests, NULL, NULL);
}
