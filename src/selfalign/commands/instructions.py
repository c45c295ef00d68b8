"""CLI commands of this stage (filled in by the stage's work)."""


def register(app) -> None:
    pass
