"""qsmprep.utils."""
