"""Tessera's faces: the command line (``app.cli``) and, later, the REST service and job runners."""

__version__ = "0.1.0"
