"""restore.models"""
