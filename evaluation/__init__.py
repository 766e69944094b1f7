"""The evaluation: every defense against the attacks, in the paper's table shapes, and its report. It sits on top
and may import every other package (training, service, clients)."""
