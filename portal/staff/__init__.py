"""Staff pages: patients, compose, sent messages and their status."""
