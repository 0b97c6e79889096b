"""Admin pages: accounts and keys."""
