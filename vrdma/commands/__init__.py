"""Subcommands of the vrdma CLI, one module each."""
