"""The fault suite: what a hostile but fair user does to CPRec, and what CPRec must do in return.

Each test is one fault case (issue 12 and the cases found since): it fails on the code before its fix. Fast,
CPU only; tiny random models and small generated data. The README's "Faults" table summarises the cases.
"""

from __future__ import annotations


# ================================================================ prepare: readers, inputs and configs
# (section A)



# ================================================================ pack, shards and inspect
# (section B)



# ================================================================ train, checkpoints, export, sft, evaluate
# (section C)
