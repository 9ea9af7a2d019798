"""The listen side: one request's path from the socket to its response."""
