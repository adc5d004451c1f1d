"""sandboxd: runs untrusted Python 3 and Node.js code in warm, jailed workers."""

__version__ = "0.1.0"
