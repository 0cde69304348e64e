"""`python -m perl.verl_glue --config recipe.yaml [--dry-run] key=value ...`"""

from perl.verl_glue.entry import main

raise SystemExit(main())
