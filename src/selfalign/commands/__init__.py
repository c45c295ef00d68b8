"""Subcommands per stage. Each module defines `register(app)` adding its commands to the CLI."""
