/* strata-img: subcommands not written yet. */
#include "img-private.h"
int strata_img_amend(int argc, char **argv)
{
    (void)argc;
    strata_img_error("%s: not implemented yet", argv[0]);
    return 1;
}
