/* placeholder: filled in by its owner */
typedef int strata_placeholder_t;
