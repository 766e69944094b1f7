"""clients: the user client (client.py) and the model-stealing attacker (steal.py, attack/)."""


def steal() -> int:
    """The `astguard-steal` console script: a missing extra is a one-line error (astguard.cli.launch)."""
    from astguard.cli import launch

    def load():
        from clients.steal import main
        return main

    return launch("astguard-steal", "attack", load)
