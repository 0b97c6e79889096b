"""Subcommands of ``portal``; each module attaches its group to portal.cli.main on import."""
