"""Commands: the one place where the package meets its users (``saferclip-data ...``)."""
