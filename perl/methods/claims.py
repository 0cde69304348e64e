"""The paper's claims about methods (arXiv 2512.23165) and TinyLoRA's, as comparisons the study's
numbers can check (perl.toy.study.findings_markdown reads them; `perl bench toy` runs the cells).

Each claim: (what it says, the variants it is about, the test each variant is put to). "vs_lora":
the variant's held-out Avg@k after training against LoRA's; "collapse": whether training stopped
early or ended below the base model; "gain_share": its gain over the base as a share of LoRA's.
"""

from __future__ import annotations

REFERENCE = "lora"  # every claim is relative to LoRA at the same settings

CLAIMS = (
    ("structural variants beat LoRA (paper, Finding 1)", ("dora", "adalora", "miss"), "vs_lora"),
    ("extreme reductions hit an expressivity floor (paper, Finding 2)", ("vera", "ia3", "lora:r1", "ln_tuning"),
     "gain_share"),
    ("SVD-initialised methods collapse (paper, Finding 3)", ("pissa", "milora"), "collapse"),
    ("13 parameters recover most of RL's gain (TinyLoRA)", ("tinylora",), "gain_share"),
)
