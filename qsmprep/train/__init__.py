"""qsmprep.train."""
