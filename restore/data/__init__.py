"""restore.data"""
