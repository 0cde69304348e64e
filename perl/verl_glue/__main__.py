"""`python -m perl.verl_glue --config recipe.yaml [--dry-run] key=value ...`"""

from perl.cli_exit import without_final_collection
from perl.verl_glue.entry import main

raise SystemExit(without_final_collection(main()))
