"""training: data -> teacher (every recipe in training.teachers) -> verified ONNX export and model card."""


def train() -> int:
    """The `astguard-train` console script: a missing extra is a one-line error (astguard.cli.launch)."""
    from astguard.cli import launch

    def load():
        from training.train_ast import main
        return main

    return launch("astguard-train", "train", load)
