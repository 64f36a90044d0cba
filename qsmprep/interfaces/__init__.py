"""qsmprep.interfaces."""
