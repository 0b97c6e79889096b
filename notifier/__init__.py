"""The notifier: turns outbox rows into PHI-free notice emails sent over verified TLS."""
