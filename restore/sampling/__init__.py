"""restore.sampling"""
