"""The attacker as a library, in the shape ART gives extraction attacks: plan queries -> buy the victim's answers
-> distill a student.

- `victim`: who answers. `EndpointVictim`, a live service through the user client; `OnnxVictim`, an exported
  model in onnxruntime behind the same output defense the service applies (the evaluation's served teachers).
- `queries`: which images to send (`plan_queries`).
- `answers`: buying them, with the transfer-set cache, resume and the server's budget (`TransferSet`, `buy`,
  `buy_cached`).
- `student`: fitting a student to the answers and scoring it (`distillation`, `distill_student`, `score`).

`clients/steal.py` (the CLI) and the evaluation's query protocol both use it.
"""
