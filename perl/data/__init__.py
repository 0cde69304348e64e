"""Datasets in verl's parquet schema: the paper's training and evaluation sets, CHAMP, and a
synthetic arithmetic task for the CPU toy run. See `prepare.py`."""

from .prepare import (
    DEFAULT_TEMPLATE,
    SOURCES,
    PreparedSet,
    arithmetic_rows,
    champ_rows,
    load_rows,
    prepare,
    to_verl_rows,
    write_parquet,
)

__all__ = ["DEFAULT_TEMPLATE", "SOURCES", "PreparedSet", "arithmetic_rows", "champ_rows", "load_rows", "prepare",
           "to_verl_rows", "write_parquet"]
