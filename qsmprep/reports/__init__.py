"""qsmprep.reports."""
