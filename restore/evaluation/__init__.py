"""restore.evaluation"""
