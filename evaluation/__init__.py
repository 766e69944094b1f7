"""The evaluation: every defense against the attacks, in the paper's table shapes, and its report. It sits on top
and may import every other package (training, service, clients)."""


def evaluate() -> int:
    """The `astguard-evaluate` console script: a missing extra is a one-line error (astguard.cli.launch)."""
    from astguard.cli import launch

    def load():
        from evaluation.evaluate import main
        return main

    return launch("astguard-evaluate", "eval", load)
