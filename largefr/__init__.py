"""largefr: face-recognition training at millions of identities."""
__version__ = "0.1.0"
