"""restore.methods"""
