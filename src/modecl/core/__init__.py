"""Core: adapters, training, methods, evaluation against a token format, the runner,
results and the report. Imports neither `modecl.hosts` nor `modecl.digits` (import-linter).
"""
