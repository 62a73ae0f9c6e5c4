"""Published slides: the layout that writers and readers share, and the reader of that layout."""

__all__ = ["cache", "layout", "slide", "store", "sync", "values"]
