"""restore.metrics"""
