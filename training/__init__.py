"""The built-in DPO step: `loss` (DPO / IPO / hinge with soft labels), `logps` (chat-templated
sequence log-probs, packed pairs), `data` (pairs from the store or TRL-format records, the
reference log-prob cache), `trainer` (the loop), `checkpoint` (save / resume).

`flows/train.py` wires them to the store and Prefect; nothing here imports `flows` or `engines`.
"""
