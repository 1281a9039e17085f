"""Folders on disk: opened by descriptor, who may work in them, overlaps,
and who owns what the daemon makes.
"""
