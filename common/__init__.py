"""The bottom layer every other package may use: small collectives that are no-ops on one process, the base class
of the errors a user can cause, and the one-line error handler of the command-line tools.
"""
