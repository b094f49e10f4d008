"""Reference implementations we measure against (not part of the library)."""
