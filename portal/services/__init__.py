"""Domain operations. They flush, never commit; the caller commits at its boundary."""
