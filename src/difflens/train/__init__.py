"""difflens.train"""
