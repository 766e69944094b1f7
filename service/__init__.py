"""service: serves defended probabilities from an ONNX teacher over HTTP; no torch."""


def serve() -> int:
    """The `astguard-serve` console script: a missing extra is a one-line error (astguard.cli.launch)."""
    from astguard.cli import launch

    def load():
        from service.cli import main
        return main

    return launch("astguard-serve", "serve", load)
