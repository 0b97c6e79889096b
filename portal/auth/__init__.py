"""Sign-in, enrolment, recovery and session views (HTTP only; the work is in services)."""
